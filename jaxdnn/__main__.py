"""`python -m jaxdnn`: the `jaxdnn` command."""
import sys

from jaxdnn.cli import main

sys.exit(main())
