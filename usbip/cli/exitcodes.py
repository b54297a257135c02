"""Exit codes of the ``usbip`` and ``usbipd`` commands."""

OK = 0
FAILURE = 1  # the operation failed (see the message)
USAGE = 2  # bad command line
UNREACHABLE = 3  # cannot connect to the server
REFUSED = 4  # the server refused (status from OP_REP_*)
NO_DRIVER = 5  # vhci-hcd / usbip-host not loaded, no free port, or no permission
