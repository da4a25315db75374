import importlib
import pkgutil
import sys

import flowlab.bench as _pkg

names = sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__) if not m.name.startswith("_"))
if len(sys.argv) < 2 or sys.argv[1] not in names:
    print(f"usage: python -m flowlab.bench {{{','.join(names)}}} [options]", file=sys.stderr)
    sys.exit(2)
sys.exit(importlib.import_module(f"flowlab.bench.{sys.argv[1]}").main(sys.argv[2:]) or 0)
