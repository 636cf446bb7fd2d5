"""python-dbusmock template for the parts of systemd-logind (org.freedesktop.login1) cluo uses.

The stock dbusmock logind template needs PyGObject; this one does not. No parameters.

Methods on org.freedesktop.login1.Manager:
  Reboot(b interactive), RebootWithFlags(t flags)
      recorded by dbusmock (GetMethodCalls); they fail while a reboot error is set
  ListInhibitors() -> a(ssssuu)
      (what, who, why, mode, uid, pid) of fake inhibitors and of held Inhibit() locks
  Inhibit(ssss) -> h
      the write end of a pipe, like logind's FIFO; the lock is listed with the caller's uid
      and pid until every copy of that fd is closed

Helpers on the mock interface (org.freedesktop.DBus.Mock):
  AddInhibitor(what, who, why, mode, uid, pid)   list a fake inhibitor (no fd behind it)
  ClearInhibitors()                               drop every inhibitor, held ones included
  SetRebootError(name, message)                   later Reboot* calls raise this D-Bus error
  ClearRebootError() -> u                         Reboot* succeed again; returns how many
                                                  Reboot* calls were refused until now
"""

import os
import select

import dbus
from dbusmock import MOCK_IFACE

BUS_NAME = "org.freedesktop.login1"
MAIN_OBJ = "/org/freedesktop/login1"
MAIN_IFACE = "org.freedesktop.login1.Manager"
SYSTEM_BUS = True

# What systemd >= 257 answers Reboot() while a block inhibitor is held, even for root.
BLOCKED_BY_INHIBITOR_ERROR = "org.freedesktop.login1.BlockedByInhibitorLock"
BLOCKED_BY_INHIBITOR_MESSAGE = "Operation denied due to active block inhibitor"

INHIBITOR_SIGNATURE = "ssssuu"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"

INTROSPECTION_XML = f"""<node>
  <interface name="{MAIN_IFACE}">
    <method name="Reboot">
      <arg name="interactive" type="b" direction="in"/>
    </method>
    <method name="RebootWithFlags">
      <arg name="flags" type="t" direction="in"/>
    </method>
    <method name="ListInhibitors">
      <arg name="inhibitors" type="a({INHIBITOR_SIGNATURE})" direction="out"/>
    </method>
    <method name="Inhibit">
      <arg name="what" type="s" direction="in"/>
      <arg name="who" type="s" direction="in"/>
      <arg name="why" type="s" direction="in"/>
      <arg name="mode" type="s" direction="in"/>
      <arg name="pipe_fd" type="h" direction="out"/>
    </method>
  </interface>
</node>
"""


def load(mock, _parameters):
    # [(what, who, why, mode, uid, pid), read end of the pipe or None for a fake], ...
    mock.inhibitors = []
    # (error name, message) or None
    mock.reboot_error = None
    mock.refused_reboots = 0


def _writer_closed(read_fd):
    """True once every copy of the pipe's write end is closed (POLLHUP on the read end)."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    return any(events & select.POLLHUP for _fd, events in poller.poll(0))


def _drop_released(mock):
    held = []
    for record, read_fd in mock.inhibitors:
        if read_fd is not None and _writer_closed(read_fd):
            os.close(read_fd)
        else:
            held.append((record, read_fd))
    mock.inhibitors = held


def _caller_credentials(mock, sender):
    """uid and pid of the connection that called us, as logind records them."""
    bus = mock.connection
    uid = bus.call_blocking(
        DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetConnectionUnixUser", "s", (sender,)
    )
    pid = bus.call_blocking(
        DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetConnectionUnixProcessID", "s", (sender,)
    )
    return int(uid), int(pid)


def _refuse_if_asked(mock):
    if mock.reboot_error is not None:
        name, message = mock.reboot_error
        mock.refused_reboots += 1
        raise dbus.exceptions.DBusException(message, name=name)


@dbus.service.method(MAIN_IFACE, in_signature="b", out_signature="")
def Reboot(self, _interactive):
    _refuse_if_asked(self)


@dbus.service.method(MAIN_IFACE, in_signature="t", out_signature="")
def RebootWithFlags(self, _flags):
    _refuse_if_asked(self)


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature=f"a({INHIBITOR_SIGNATURE})")
def ListInhibitors(self):
    _drop_released(self)
    return dbus.Array(
        [dbus.Struct(record, signature=INHIBITOR_SIGNATURE) for record, _fd in self.inhibitors],
        signature=f"({INHIBITOR_SIGNATURE})",
    )


@dbus.service.method(MAIN_IFACE, in_signature="ssss", out_signature="h", sender_keyword="sender")
def Inhibit(self, what, who, why, mode, sender=None):
    uid, pid = _caller_credentials(self, sender)
    read_fd, write_fd = os.pipe()
    self.inhibitors.append(((what, who, why, mode, uid, pid), read_fd))
    try:
        return dbus.types.UnixFd(write_fd)  # keeps its own dup until the reply is sent
    finally:
        os.close(write_fd)


@dbus.service.method(MOCK_IFACE, in_signature=INHIBITOR_SIGNATURE, out_signature="")
def AddInhibitor(self, what, who, why, mode, uid, pid):
    self.inhibitors.append(((what, who, why, mode, uid, pid), None))


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="")
def ClearInhibitors(self):
    for _record, read_fd in self.inhibitors:
        if read_fd is not None:
            os.close(read_fd)
    self.inhibitors = []


@dbus.service.method(MOCK_IFACE, in_signature="ss", out_signature="")
def SetRebootError(self, name, message):
    self.reboot_error = (name, message)


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="u")
def ClearRebootError(self):
    self.reboot_error = None
    return dbus.UInt32(self.refused_reboots)
