import sys

from fastinv.cli import main

sys.exit(main())
