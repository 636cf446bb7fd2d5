"""cluo-coord: the in-cluster coordinator that grants reboot slots."""
