import sys

from ipl_diffusion.cli import main

sys.exit(main())
