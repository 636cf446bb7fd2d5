"""cluo-agent: the host daemon that drains and reboots its own node."""
