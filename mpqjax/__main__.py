import sys

from mpqjax.cli import main

sys.exit(main())
