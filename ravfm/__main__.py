import sys

from ravfm.cli import main

sys.exit(main())
