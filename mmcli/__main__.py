"""``python -m mmcli``: the same command line as the ``mmcli`` script."""

from mmcli.cli import main

main()
