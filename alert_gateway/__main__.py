import sys

from alert_gateway.server import main

sys.exit(main())
