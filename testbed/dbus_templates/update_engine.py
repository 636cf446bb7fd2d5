"""python-dbusmock template for Flatcar's update_engine (com.coreos.update1).

Parameters (all optional) set the initial status:
  LastCheckedTime (int64), Progress (double), CurrentOperation (str), NewVersion (str),
  NewSize (int64). Defaults: 0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0.

Methods on com.coreos.update1.Manager:
  GetStatus() -> xdssx   the current status
  AttemptUpdate()        recorded only; drive the state with SetStatus
  ResetStatus()          back to idle, emits StatusUpdate

Helpers on the mock interface (org.freedesktop.DBus.Mock):
  SetStatus(xdssx)       store a new status and emit StatusUpdate, as the daemon does on
                         every state change

Like the real daemon, StatusUpdate is also emitted once when the template is loaded.
dbusmock does not introspect signals: clients use INTROSPECTION_XML below.
"""

import dbus
from dbusmock import MOCK_IFACE

BUS_NAME = "com.coreos.update1"
MAIN_OBJ = "/com/coreos/update1"
MAIN_IFACE = "com.coreos.update1.Manager"
SYSTEM_BUS = True

STATUS_SIGNAL = "StatusUpdate"
STATUS_SIGNATURE = "xdssx"
OPERATION_IDLE = "UPDATE_STATUS_IDLE"
NO_VERSION = "0.0.0"

_STATUS_ARGS = """
      <arg name="last_checked_time" type="x" {direction}/>
      <arg name="progress" type="d" {direction}/>
      <arg name="current_operation" type="s" {direction}/>
      <arg name="new_version" type="s" {direction}/>
      <arg name="new_size" type="x" {direction}/>"""

INTROSPECTION_XML = f"""<node>
  <interface name="{MAIN_IFACE}">
    <method name="AttemptUpdate"/>
    <method name="ResetStatus"/>
    <method name="GetStatus">{_STATUS_ARGS.format(direction='direction="out"')}
    </method>
    <signal name="{STATUS_SIGNAL}">{_STATUS_ARGS.format(direction="")}
    </signal>
  </interface>
</node>
"""


def load(mock, parameters):
    mock.update_status = _status(
        parameters.get("LastCheckedTime", 0),
        parameters.get("Progress", 0.0),
        parameters.get("CurrentOperation", OPERATION_IDLE),
        parameters.get("NewVersion", NO_VERSION),
        parameters.get("NewSize", 0),
    )
    _emit_status(mock)


def _status(last_checked_time, progress, current_operation, new_version, new_size):
    """Normalise D-Bus or JSON values to the plain Python types of xdssx."""
    return (
        int(last_checked_time),
        float(progress),
        str(current_operation),
        str(new_version),
        int(new_size),
    )


def _emit_status(mock):
    mock.EmitSignal(MAIN_IFACE, STATUS_SIGNAL, STATUS_SIGNATURE, list(mock.update_status))


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature=STATUS_SIGNATURE)
def GetStatus(self):
    return self.update_status


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="")
def AttemptUpdate(self):
    pass


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="")
def ResetStatus(self):
    last_checked_time = self.update_status[0]
    self.update_status = _status(last_checked_time, 0.0, OPERATION_IDLE, NO_VERSION, 0)
    _emit_status(self)


@dbus.service.method(MOCK_IFACE, in_signature=STATUS_SIGNATURE, out_signature="")
def SetStatus(
    self, last_checked_time, progress, current_operation, new_version, new_size
):
    self.update_status = _status(
        last_checked_time, progress, current_operation, new_version, new_size
    )
    _emit_status(self)
