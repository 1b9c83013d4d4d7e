import sys

from hfp_fx.cli import main

sys.exit(main())
