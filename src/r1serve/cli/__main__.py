import sys

from r1serve.cli.parser import main

sys.exit(main())
