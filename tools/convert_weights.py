#!/usr/bin/env python
"""Convert torchvision/timm weights to a jaxtl model folder (same as ``python -m jaxtl.convert``)."""

import sys

from jaxtl.convert import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
