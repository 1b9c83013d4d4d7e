import sys

from hfp_fx.interop.cli import main

sys.exit(main())
