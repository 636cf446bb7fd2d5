"""The coordinator's pure planning core: ``plan(nodes, leases, now, policy) -> Plan``.

The reconcile driver reads the whole cluster (Nodes and slot Leases), calls ``plan`` and
applies the returned changes: each node's (and each Lease's) in the plan's order, different
nodes' side by side, nothing new started after the first error (cluo_coord.apply); then it
runs again on the next watch event or after ``Plan.recheck_after``. Nothing here does I/O or reads a
clock: ``now`` is an aware ``datetime`` (any zone; UTC is what the driver passes).

One reboot cycle, CLUO compatible (docs/protocol.md)::

    agent: reboot-needed=true
    AcquireSlot          slot Lease names the node, records its bootID   (lease CAS)
    LabelBeforeReboot    label before-reboot, clear before-hook annotations (only with
                         before-reboot hooks: without, GrantRebootOk follows AcquireSlot
                         in the same plan, and no label is written)
      ... before-reboot hook annotations become "true"
    GrantRebootOk        reboot-ok=true, remove label + hook annotations  (node CAS,
                         and only while the slot Lease is unchanged)
      ... agent: reboot-in-progress, drain, reboot; reboot-needed=false, in-progress=false
    LabelAfterReboot     once the reboot is proven (see ``reboot_proven``); only with
                         after-reboot hooks: without, ResetRebootOk follows the proof
                         in the same plan, and no label is written
      ... after-reboot hook annotations become "true"
    ResetRebootOk        reboot-ok=false, remove labels + hook annotations  (node CAS);
                         and, if the agent cordoned the node, uncordon it and remove
                         agent-made-unschedulable in the same write (rule 10)
      ... agent: removes boot-id-before-reboot
    ReleaseSlot          once the node is schedulable again (rule 10), after the reset
                         (rule 4: in the same plan, or a no-op one in a later plan); the
                         next node gets it on the next plan, or in this one: the
                         hand-over, an AcquireSlot for the head of the queue at the
                         version naming this node (``_handed``)

The rules that keep "never more than ``max_concurrent`` in flight" true whatever the
cluster looks like (stale caches, restarts, partially applied plans, old coordinators):

1. *In flight* means: named by a slot Lease, or ``reboot-ok=true``, or
   ``reboot-in-progress=true``, or *cordoned by cluo* (``spec.unschedulable`` with the
   agent's ``agent-made-unschedulable=true``). A node that no slot names but that shows
   any of these (a stale view: an older coordinator, CLUO, a hand edit, an agent that has
   not uncordoned yet) counts too. The one exception is ``release-slot=true``: the admin
   has taken that node out of the count.
   New slots are taken only while fewer than ``max_concurrent`` nodes are in flight, and
   only slots ``0 .. max_concurrent-1`` are ever taken.
2. Every write carries the resource version of the object as the planner saw it, and the
   driver writes with that precondition (compare-and-swap). A change computed from a stale
   view therefore fails with a conflict instead of acting on an old picture. No plan writes
   the same object twice, so every expected resource version is the one from the view.
3. ``GrantRebootOk`` also carries the slot Lease's resource version: the driver writes
   ``reboot-ok=true`` only while that Lease is unchanged (an uncached read, or an update
   with that resourceVersion, right before the node write: with the health gate on, its
   record of the node's workloads is that update, so the Lease is not read again; a
   grant that follows its AcquireSlot in one plan, ``after_acquire``, expects the version
   that acquisition's compare-and-swap returned, and that write is the check). So
   reboot-ok=true is only ever written while the Lease names the node.
4. Every ``ReleaseSlot`` follows a ``ResetRebootOk`` of the holder in the same plan (but
   the release of a holder whose Node is gone, rule 11), even when the view says there
   is nothing to reset: the driver then checks the node's resource version by an
   uncached read. A slot is released only if the node really is in
   the reset state the planner saw. A hand-over (``AcquireSlot.handed_from``) is such a
   release: it takes the place of the ReleaseSlot after the same reset, and is made
   only for a holder whose cycle is done (it needs no reboot, is not rebooting and not
   cordoned by cluo: once reset it counts only through its slot, rule 1), only without
   ``delay_between_reboots``, and by the grant walk under the same rules as any take,
   the holder's slot offered before any free one: a take that counts the holder out is
   always that hand-over, which the driver writes after the reset. A holder of one
   global slot and at most one slot of each group (rule 15) hands each group slot over
   the same way, in a compare-and-swap of its own, to a taker that needs a slot of that
   group (and only then is the holder out of that group's counts), and releases the
   others; the taker's cycle goes on after all of them. ``reboot-ok=false``
   is never written while the node reports ``reboot-in-progress=true`` (the cycle
   waits for the agent), except for an admin release (rule 7) or pause (rule 12). The
   release itself waits for rule 10.
5. Restarts need no memory: the Lease is the source of truth. A slot that names a node
   continues that node's cycle from whatever the node shows (a crash between AcquireSlot
   and GrantRebootOk resumes the same grant); a taken slot is never given to another node.
   A crash between the reset and the release of an *abort* leaves a node that shows
   only the drain failure the reset recorded (rule 13): its slot is released then, and
   the node waits out its backoff like any other.
6. The global pause and the windows only stop *new* slots: a node that holds a slot
   finishes its cycle. A node's own ``reboot-paused`` also cancels its grant (rule 12).
7. A holder that has not finished ``reboot_timeout`` after taking its slot keeps the slot
   (a bad update must not spread), is marked stuck on its Lease and gets one Warning
   event. ``release-slot=true`` on the node releases it at once (reset first, as in
   rule 4, but without waiting for rule 10); the annotation is cleared once the node
   shows no reboot in progress and is no longer cordoned by cluo, and until then the
   node is not counted (rule 1).
8. An abort (the agent cleared reboot-in-progress but still needs a reboot, with a
   ``blocked-reason``) resets the grant and releases the slot, both once the agent has
   uncordoned the node (rule 10: the grant stays out until then, so the node still shows
   an abort and not a fresh slot); the reset records the failed drain (rule 13).
   GrantRebootOk clears ``blocked-reason`` so that a reason left from an earlier attempt
   never reads as an abort of this one.
9. A node named by several slots (possible only after acting on a stale Lease view) keeps
   all of them until its cycle ends: wasting capacity is safe, freeing a slot it uses is
   not. Its *primary* slot, the one taken first, carries the grant and the boot id.
10. A slot is released only once its holder is schedulable again: ``spec.unschedulable``
    false, or cordoned without ``agent-made-unschedulable`` (an admin cordoned it before
    cluo touched it; cluo never uncordons such a node). At the end of a proven reboot
    (after-reboot hooks done) the coordinator's reset itself uncordons a node the agent
    cordoned: ``spec.unschedulable`` false and the mark removed, in the reset's one
    compare-and-swap (``ResetRebootOk.uncordon``), so the release (or the hand-over)
    follows in the same plan. Any other cycle's end (an abort, a withdrawn or cancelled
    grant) is uncordoned by the agent after ``reboot-ok=false``, and the release waits
    for it: the reset, then (once the agent has uncordoned) the release. With rule 1
    this keeps "never more than ``max_concurrent`` nodes unschedulable because of cluo"
    (admin releases excepted).
11. A holder whose Node object is gone (deleted: nothing of it can be unschedulable or
    rebooting any more) frees its slots at once: the one release without a reset before
    it (rule 4), and the driver writes it only after an uncached read found no such Node
    (a Node outside ``--node-selector`` is not gone). A Warning Event on the slot Lease
    says so. A Node re-created under the same name (another ``metadata.uid`` than the
    one the slot recorded) is a new node that has not been proven back: its slot is
    released (reset first, rule 4) once the new node is Ready (for ``min_ready``), not
    cordoned by cluo and not rebooting, again with a Warning Event.
12. A holder paused (``reboot-paused=true``) before its reboot has its grant cancelled,
    CLUO's ``cleanupState``: ``reboot-ok=false`` with its labels and hook annotations
    removed (even while the agent drains: the agent then stops the drain and hands the
    grant back), and the slot released once the agent no longer reports a reboot in
    progress and has uncordoned the node (rule 10). "Before its reboot": the agent has
    recorded no ``boot-id-before-reboot`` (it does so when the drain is done, right
    before asking logind) and the node still runs the boot it took the slot in. Past
    that point the cycle finishes, after-reboot hooks included.
13. A failed drain backs off, per node, in the cluster. The reset of an abort (rule 8)
    is planned from a view that shows the agent's ``blocked-reason`` (the agent keeps it
    until ``reboot-ok=false``, so nothing races), and the same node write records
    ``drain-failures=n`` (failed drains in a row) and ``drain-retry-at`` (``now`` plus
    ``drain_backoff``, doubling per failure, capped at ``drain_backoff_max``). A node
    with ``drain-failures`` takes no new slot before ``drain-retry-at``, and after it
    queues behind every node with fewer failures (``queue_key``), so waiting nodes go
    first by rule. At ``max_drain_attempts`` no retry time is written and the node takes
    no slot until an admin removes ``drain-failures`` (``cluo-coord retry``). A reboot
    done, or no longer needed, removes both annotations. Being on the Node, the backoff
    survives restarts and leader changes.
14. The brake (``max_failed_reboots`` K, 0: off). A holder fails its reboot proof when,
    granted, it is not back at ``reboot_timeout`` (rule 7's MarkStuck: it did not come
    back, or came back NotReady), or when it is proven back on an OS version (its
    ``version`` label) older than the ``new-version`` it announced when it took the slot
    (recorded on the slot Lease). Each failure is recorded once per node on the leader
    Lease (``RecordFailedReboot``, before the MarkStuck or LabelAfterReboot that goes with
    it, or without after-reboot hooks the reset, so a crash in between records it again
    rather than never); once K nodes are on the
    record and the roll is not paused, ``PauseRoll`` pauses it with a Warning Event, and
    the pause holds new slots as rule 6's does, until an admin resumes (which clears the
    record). A stuck slot is marked once, so a resumed roll does not count it again.
15. Groups, budgets, control-plane nodes, the canary (``Policy.groups``,
    ``max_unavailable``; cluo_coord.groups). A node is in the first ``--group`` whose
    selector matches its labels, else in the group its ``group`` label names, else in
    ``default``. A group with a max-concurrent m or a max-unavailable u (a count, or a
    percentage of its nodes rounded up) has slot Leases of its own, indices
    ``0 .. min(m, u)-1`` (the canary group, with neither, ``max_concurrent``);
    control-plane nodes (label ``node-role.kubernetes.io/control-plane``) share one more
    slot. Such a node takes its group slot(s) first, each by compare-and-swap as a global
    slot (rule 2), then a global slot, in the same plan or a later one; the before-reboot
    label follows the global slot. ``GrantRebootOk`` is planned only for a holder the view
    shows holding every slot its group and role need, and carries each one's resource
    version: the driver checks each of those Leases as rule 3 checks the global one
    (without before-reboot hooks, one taken in the same plan by the acquisition's
    compare-and-swap, as the global one, ``after_acquire``). A
    group slot is released only with its holder's global slots, after the reset of
    rule 4; or, held alone (a plan cut short between the two acquisitions), by a node that
    shows no part of a cycle and that a holder of a global slot would release too from
    the same Node version (no reboot needed, released by an admin, out of the roll:
    ``_gives_back``), again after a reset, so no plan from another view of the Leases can
    label or grant it from that version; or by a queued node that the grant walk holds
    back (any hold: the canary, a budget, the control-plane rule, no room), again after a
    reset (``_give_back_held_back``): kept while it waits, they could be the very slots
    the node it waits behind needs (a control-plane node of the canary group, the
    control-plane slot of one that waits for the canary), and nothing would move. It takes
    them again with its global slot, in one plan, when its turn comes; a plan from an older
    view of the Leases may label it meanwhile, but grants it only with every slot checked
    (rule 3). A finished holder's group slot may also go to the next node of its
    group in the plan that resets it: the hand-over of rule 4, with the global slot. So,
    as rule 1 says of the global slots, never
    more than min(m, u) nodes of a group, and one control-plane node, are granted
    (reboot-ok, in progress, cordoned by cluo), whatever the views; a node of the group
    may hold a global slot, and run its before-reboot hooks, while it waits for its group
    slot after such a race. ``max_unavailable`` also bounds the global slots
    taken (``0 .. min(max_concurrent, u)-1``), so cluo's own nodes in flight never exceed
    it. Beyond these, which hold by construction, a slot is taken only if, in the plan's
    view, the nodes unavailable (NotReady, cordoned by anyone, being deleted, in flight:
    each once) stay within max-unavailable with the node, globally and in its group; a
    control-plane node's only while no other control-plane node is unavailable; another
    group's only while no node of the canary group needs a reboot (unpaused) or is in
    flight, and ``canary_soak`` has passed since the latest release on the canary group's
    slot Leases (a time in the cluster: it survives restarts). These three are judged on
    the view: a node that fails after a grant, or a view older than the failure, can take
    the cluster past them, which no coordinator can prevent. What holds the queue is a
    ``Plan.holds`` sentence ("max-unavailable: ...", "max-concurrent: group ...",
    "control-plane: ...", "canary: ..."). A node of a limited group that holds a global
    slot but none of its group (its group configured, or its labels changed, after it
    took the global one) waits for one before its grant, ahead of the queue.

The slot Lease records, besides ``spec.holderIdentity`` and ``spec.acquireTime``, the
holder's ``status.nodeInfo.bootID`` and ``metadata.uid`` at the time it took the slot,
the release time and the stuck mark; see ``SlotLease`` for the Lease annotations.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cluo.backoff import Backoff
from cluo.kube.objects import seconds_time
from cluo.protocol import (
    NO_DRAIN_FAILURES,
    DrainBackoff,
    Keys,
    MetadataPatch,
    NodeProtocolState,
    after_reboot_patch,
    before_reboot_patch,
    grant_patch,
    hooks_done,
    reset_patch,
)
from cluo_coord.brake import FailedReboot, older_version
from cluo_coord.groups import CONTROL_PLANE_SLOTS, Budget, Groups, is_control_plane
from cluo_coord.health import ALL_CLEAR, Health
from cluo_coord.windows import RebootWindows

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class NodeView:
    """What the planner needs to know about one Node, as the driver read it.

    ``ready_since`` is the Ready condition's ``lastTransitionTime`` while it is True.
    ``boot_id`` is ``status.nodeInfo.bootID`` (empty when the kubelet did not report one).
    ``annotations`` are all of the Node's annotations (hook annotations are user-chosen).
    ``reboot_needed_since`` orders the queue; see ``reboot_needed_since`` for where the
    driver takes it from. ``unschedulable`` is ``spec.unschedulable``: with the agent's
    ``agent-made-unschedulable`` it means cordoned by cluo (rules 1 and 10). An
    admin-cordoned node is rebooted like any other and stays cordoned (the agent
    uncordons only what it cordoned).
    """

    name: str
    state: NodeProtocolState
    resource_version: str
    uid: str = ""  # metadata.uid: a re-created Node has another one
    ready: bool = False
    ready_since: datetime | None = None
    boot_id: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    unschedulable: bool = False
    runs_coordinator: bool = False
    reboot_needed_since: datetime | None = None
    os_version: str = ""  # the agent's os-release version label (rule 14)
    labels: Mapping[str, str] = field(default_factory=dict)  # groups, control plane (rule 15)
    deleting: bool = False  # metadata.deletionTimestamp is set: unavailable (rule 15)


@dataclass(frozen=True)
class SlotLease:
    """One reboot slot: the Lease ``cluo-reboot-slot-<index>``.

    ``resource_version`` is None when the Lease object does not exist yet (a free slot;
    AcquireSlot then creates it). Where each field lives on the Lease (proposal):

    - ``holder``: ``spec.holderIdentity`` (None or empty when free).
    - ``acquired_at``: ``spec.acquireTime``.
    - ``holder_boot_id``: annotation ``cluo.flatcar-linux.net/holder-boot-id``, the
      holder's ``status.nodeInfo.bootID`` when it took the slot.
    - ``released_at``: annotation ``cluo.flatcar-linux.net/released-at`` (RFC 3339), set
      when the slot is released; ``delay_between_reboots`` counts from it.
    - ``stuck``: annotation ``cluo.flatcar-linux.net/stuck: "true"``, set by MarkStuck.
    - ``holder_uid``: annotation ``cluo.flatcar-linux.net/holder-uid``, the holder Node's
      ``metadata.uid`` when it took the slot (empty on slots taken by older coordinators:
      then a re-created Node is not told apart).

    ``spec.leaseDurationSeconds`` stays unset: a slot never expires on its own.
    """

    index: int
    holder: str | None = None
    resource_version: str | None = None
    acquired_at: datetime | None = None
    holder_boot_id: str = ""
    released_at: datetime | None = None
    stuck: bool = False
    holder_uid: str = ""
    announced_version: str = ""  # annotation announced-version: new-version at acquire
    group: str = ""  # "": a global slot; else a slot of this group (rule 15)
    transitions: int = 0  # spec.leaseTransitions: how many holders it has had


@dataclass(frozen=True)
class Policy:
    """The coordinator's configuration, as far as planning goes.

    ``reboot_timeout`` bounds a whole cycle, from taking the slot to releasing it (hooks,
    drain, reboot, ``min_ready``): past it the holder is reported stuck (it keeps the slot).
    ``min_ready`` is how long a rebooted node must have been Ready before it counts as back.
    ``delay_between_reboots`` is how long a released slot rests before it is taken again.
    ``paused`` is the global pause. ``windows`` gate new slots (default: always open).
    ``drain_backoff`` is how long a node whose drain failed waits before it may take a
    slot again, doubling per failure in a row up to ``drain_backoff_max``; after
    ``max_drain_attempts`` failures in a row it is out of the roll (rule 13).
    ``max_failed_reboots`` is the brake (rule 14; 0: off, the default here, while
    cluo-coord's flag defaults to 2); ``failed_reboots`` the nodes already on its record.
    """

    max_concurrent: int = 1
    before_reboot_annotations: tuple[str, ...] = ()
    after_reboot_annotations: tuple[str, ...] = ()
    reboot_timeout: timedelta = timedelta(hours=1)
    min_ready: timedelta = timedelta(0)
    delay_between_reboots: timedelta = timedelta(0)
    paused: bool = False
    windows: RebootWindows = field(default_factory=RebootWindows)
    keys: Keys = field(default_factory=Keys)
    drain_backoff: timedelta = timedelta(minutes=10)
    drain_backoff_max: timedelta = timedelta(hours=2)
    max_drain_attempts: int = 5
    max_failed_reboots: int = 0
    failed_reboots: frozenset[str] = frozenset()
    groups: Groups = field(default_factory=Groups)  # rule 15
    max_unavailable: Budget | None = None  # rule 15; None: unlimited
    canary_soak: timedelta = timedelta(0)  # rule 15: after the canary group's last release

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, not {self.max_concurrent}")
        if self.max_drain_attempts < 1:
            raise ValueError(
                f"max_drain_attempts must be at least 1, not {self.max_drain_attempts}")
        if not timedelta(0) < self.drain_backoff <= self.drain_backoff_max:
            raise ValueError(
                f"drain backoff must be positive and at most its maximum, not "
                f"{self.drain_backoff} (maximum {self.drain_backoff_max})")
        if self.max_failed_reboots < 0:
            raise ValueError(
                f"max_failed_reboots must not be negative, not {self.max_failed_reboots}")
        if self.reboot_timeout <= timedelta(0):
            raise ValueError(f"reboot_timeout must be positive, not {self.reboot_timeout}")
        for name in ("min_ready", "delay_between_reboots"):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")

    @property
    def hook_annotations(self) -> tuple[str, ...]:
        return self.before_reboot_annotations + self.after_reboot_annotations


# --------------------------------------------------------------------------- outputs


class EventType(enum.StrEnum):
    NORMAL = "Normal"
    WARNING = "Warning"


class Reason(enum.StrEnum):
    """Event reasons, a small fixed set (they end up in metrics and alerts)."""

    SLOT_ACQUIRED = "RebootSlotAcquired"
    REBOOT_APPROVED = "RebootApproved"
    REBOOT_VERIFIED = "RebootVerified"
    REBOOT_FINISHED = "RebootFinished"
    REBOOT_CANCELLED = "RebootCancelled"
    REBOOT_TIMED_OUT = "RebootTimedOut"
    RELEASED_BY_ADMIN = "RebootSlotReleasedByAdmin"
    HOLDER_GONE = "RebootSlotHolderGone"
    HOLDER_REPLACED = "RebootSlotHolderReplaced"
    MALFORMED_VALUE = "MalformedValue"
    DRAIN_BLOCKED = "DrainBlocked"
    REBOOT_ROLLED_BACK = "RebootRolledBack"
    ROLL_PAUSED = "RollPaused"


@dataclass(frozen=True)
class LabelBeforeReboot:
    """Label the node before-reboot=true and clear stale before-reboot hook annotations."""

    node: str
    expected_resource_version: str
    clear_annotations: tuple[str, ...] = ()

    def patch(self, keys: Keys) -> MetadataPatch:
        return before_reboot_patch(keys, self.clear_annotations)


@dataclass(frozen=True)
class GrantRebootOk:
    """reboot-ok=true; remove the before-reboot label and hook annotations.

    Also clears ``blocked-reason``: a grant starts a new attempt, and a reason left over
    from an earlier attempt must not read as an abort of this one.
    Precondition: the node at ``expected_resource_version`` *and* the slot Lease
    ``slot`` still at ``expected_lease_resource_version``.
    """

    node: str
    slot: int
    expected_resource_version: str
    expected_lease_resource_version: str
    clear_annotations: tuple[str, ...] = ()
    # Rule 15: the group slots the holder holds, (group, index, resource version); the
    # driver checks each as it checks ``slot``.
    group_slots: tuple[tuple[str, int, str], ...] = ()
    # The grant folded into the acquisition (no before-reboot hooks): ``slot`` was taken
    # by the AcquireSlot right before it in this plan, and the Lease version to expect
    # (``expected_lease_resource_version`` is then empty) is the one that compare-and-swap
    # returned, which is also rule 3's check of it; so for each group slot with an empty
    # version, taken by an AcquireSlot of this plan too.
    after_acquire: bool = False

    def patch(self, keys: Keys) -> MetadataPatch:
        return grant_patch(keys, self.clear_annotations)


@dataclass(frozen=True)
class LabelAfterReboot:
    """Label the node after-reboot=true and clear stale after-reboot hook annotations."""

    node: str
    expected_resource_version: str
    clear_annotations: tuple[str, ...] = ()

    def patch(self, keys: Keys) -> MetadataPatch:
        return after_reboot_patch(keys, self.clear_annotations)


@dataclass(frozen=True)
class ResetRebootOk:
    """reboot-ok=false; remove both phase labels and every hook annotation.

    With ``clear_release_slot`` the admin's ``release-slot`` annotation goes too; with
    ``drain_backoff`` the node's drain failures are recorded (or cleared) in the same
    write (rule 13).
    """

    node: str
    expected_resource_version: str
    clear_annotations: tuple[str, ...] = ()
    clear_release_slot: bool = False
    drain_backoff: DrainBackoff | None = None
    # The agent cordoned the node and its reboot is proven: the same write uncordons it
    # (spec.unschedulable false) and removes agent-made-unschedulable (rule 10).
    uncordon: bool = False
    # The node's cycle is over: the agent's boot-id-before-reboot goes too, so the agent
    # has nothing left to write for it.
    finished: bool = False

    def patch(self, keys: Keys) -> MetadataPatch:
        return reset_patch(keys, self.clear_annotations,
                           clear_release_slot=self.clear_release_slot,
                           drain_backoff=self.drain_backoff, uncordon=self.uncordon,
                           finished=self.finished)


@dataclass(frozen=True)
class AcquireSlot:
    """Make the slot Lease name ``node`` (create it when ``expected_resource_version`` is None).

    Records ``holder_boot_id``, ``holder_uid`` and ``at`` (acquireTime); clears
    released-at and stuck.
    """

    slot: int
    node: str
    expected_resource_version: str | None
    holder_boot_id: str
    at: datetime
    holder_uid: str = ""
    announced_version: str = ""
    group: str = ""  # "": the global slot ``slot``; else that group's slot (rule 15)
    transitions: int = 0  # spec.leaseTransitions to write: the view's plus one
    # A GrantRebootOk with ``after_acquire`` follows in this plan: the health gate's
    # record of the node's workloads goes into this compare-and-swap (a global slot's;
    # a group slot's returns the version the grant expects of it).
    grant_follows: bool = False
    # The hand-over: the Lease at ``expected_resource_version`` still names this node,
    # whose cycle this plan ends (its ResetRebootOk comes first, rule 4); this one
    # compare-and-swap is its release and the take for ``node`` (``_handed``).
    handed_from: str = ""


@dataclass(frozen=True)
class ReleaseSlot:
    """Free the slot Lease (holder none, released-at ``at``, stuck mark and boot id gone).

    ``holder_gone``: the holder's Node is gone (rule 11); the driver first checks, uncached,
    that no such Node exists.
    """

    slot: int
    node: str
    expected_resource_version: str
    at: datetime
    holder_gone: bool = False
    group: str = ""  # as AcquireSlot's


@dataclass(frozen=True)
class MarkStuck:
    """Mark the slot Lease stuck: its holder did not finish within reboot_timeout."""

    slot: int
    node: str
    expected_resource_version: str
    group: str = ""  # as AcquireSlot's


@dataclass(frozen=True)
class EmitEvent:
    """Post a Kubernetes Event about the Node (or, with ``slot``, about that slot Lease:
    for a Node that is gone). Not a CAS write; it follows the change it reports, so the
    driver posts it only when that change was applied."""

    node: str
    type: EventType
    reason: Reason
    message: str
    slot: int | None = None


@dataclass(frozen=True)
class RecordFailedReboot:
    """Add ``failure`` to the brake's record on the leader Lease (rule 14; CAS)."""

    failure: FailedReboot


@dataclass(frozen=True)
class PauseRoll:
    """Pause the roll (the brake, rule 14): paused=true, by the brake, ``reason``, ``at``,
    on the leader Lease (CAS); a roll already paused stays as it was paused."""

    reason: str
    at: datetime


NodeWrite = LabelBeforeReboot | GrantRebootOk | LabelAfterReboot | ResetRebootOk
LeaseWrite = AcquireSlot | ReleaseSlot | MarkStuck
RollWrite = RecordFailedReboot | PauseRoll
Change = NodeWrite | LeaseWrite | RollWrite | EmitEvent


@dataclass(frozen=True)
class Plan:
    """What to do now, and when time alone will change the answer.

    ``recheck_after`` is None when only an event (a watch) can change the plan.
    ``in_flight`` lists the nodes counted against ``max_concurrent`` (sorted by name),
    ``queue`` the nodes waiting for a slot in the order they get one (those that get one
    in this plan included); ``drain_backoff`` the nodes that would queue but wait out a
    drain backoff, ``out_of_roll`` those that failed ``max_drain_attempts`` drains (rule
    13); ``holds`` says, one sentence each, what keeps the queue from a free slot right
    now (the global pause, a closed window, ...; empty when nothing does). All of these
    are for status and metrics.
    """

    changes: tuple[Change, ...]
    recheck_after: timedelta | None
    in_flight: tuple[str, ...] = ()
    queue: tuple[str, ...] = ()
    drain_backoff: tuple[str, ...] = ()
    out_of_roll: tuple[str, ...] = ()
    holds: tuple[str, ...] = ()
    # Rule 15: the nodes unavailable (NotReady, cordoned, being deleted, or in flight),
    # and per group (sorted by name) its nodes in flight and queued.
    unavailable: tuple[str, ...] = ()
    groups: tuple[tuple[str, int, int], ...] = ()


# --------------------------------------------------------------------------- helpers


def reboot_needed_since(state: NodeProtocolState) -> datetime | None:
    """Where ``NodeView.reboot_needed_since`` comes from today: ``last-checked-time``.

    update_engine's last update check, mirrored by the agent: usually the check that found
    the update. It is a proxy, but one every coordinator reads the same way and that
    survives coordinator restarts, so the order stays deterministic. Missing, zero or
    unreadable: None (such nodes queue after the others). An agent-written
    ``reboot-needed-since`` annotation would be exact (proposed protocol addition).
    """
    raw = state.last_checked_time.strip()
    try:
        seconds = int(raw)
        return datetime.fromtimestamp(seconds, tz=UTC) if seconds > 0 else None
    except (ValueError, OverflowError, OSError):  # not a number, or no time a datetime holds
        return None


_NEVER = datetime.min.replace(tzinfo=UTC)  # stands in for an unknown waiting time

SKIPPED_UNTIL_FIXED = ("It reads as if unset (a boolean as false); this node gets no new "
                       "reboot slot until it is fixed.")
QUEUED_LAST = "The node queues after the nodes whose waiting time is known."


def malformed_values(view: NodeView, keys: Keys) -> tuple[str, ...]:
    """Each value of this node that does not follow the protocol, naming the key and the
    value, and what the planner does about it (the text of a log line and an Event).

    A malformed boolean reads as false, a malformed ``drain-failures`` or
    ``drain-retry-at`` as unset; either keeps the node from taking a slot
    (``_is_candidate``); a malformed ``last-checked-time`` only orders it last
    (``reboot_needed_since``). Hook annotations are not checked: anything but "true"
    means "not done yet".
    """
    found = [f"{complaint}. {SKIPPED_UNTIL_FIXED}" for complaint in view.state.complaints]
    raw = view.state.last_checked_time.strip()
    if raw and raw != "0" and reboot_needed_since(view.state) is None:
        found.append(f"{keys.last_checked_time} must be Unix seconds, not {raw!r}. "
                     f"{QUEUED_LAST}")
    return tuple(found)


def queue_key(view: NodeView) -> tuple[bool, int, bool, bool, datetime, str]:
    """The grant order: deterministic, documented, tested.

    1. the node running the coordinator goes last (its reboot moves the coordinator);
    2. nodes with fewer failed drains in a row (``drain-failures``, rule 13) go first, so
       one node whose drain cannot finish does not hold up the rest;
    3. then nodes whose agent still shows a ``blocked-reason`` go behind the others;
    4. longest waiting first, by ``reboot_needed_since`` (unknown ones after known ones);
    5. node name breaks ties.
    """
    since = view.reboot_needed_since
    return (
        view.runs_coordinator,
        view.state.drain_failures,
        bool(view.state.blocked_reason.strip()),
        since is None,
        since if since is not None else _NEVER,
        view.name,
    )


def reboot_proven(
    view: NodeView,
    boot_id_at_grant: str,
    policy: Policy,
    now: datetime,
    *,
    accept_unknown_boot: bool = False,
) -> tuple[bool, datetime | None]:
    """Whether the node is back from a reboot, and if not, when time alone could make it so.

    Proven means: the agent reported (reboot-needed=false, reboot-in-progress=false), the
    node is Ready (for ``min_ready`` at least), and its bootID differs from every boot id
    known from before the reboot: the one the slot Lease recorded at grant time and the
    agent's ``boot-id-before-reboot``. With no boot id known at all the reboot cannot be
    proven, unless ``accept_unknown_boot`` (a grant no slot backs, from CLUO: CLUO's rule).
    """
    state = view.state
    if state.reboot_needed or state.reboot_in_progress or not view.ready or not view.boot_id:
        return False, None
    before = {boot for boot in (boot_id_at_grant, state.boot_id_before_reboot) if boot}
    if view.boot_id in before or (not before and not accept_unknown_boot):
        return False, None
    return _ready_for(view, policy.min_ready, now)


def _ready_for(view: NodeView, min_ready: timedelta, now: datetime
               ) -> tuple[bool, datetime | None]:
    """Whether the node has been Ready for ``min_ready``; if not, when it will have been."""
    if not view.ready:
        return False, None
    if min_ready > timedelta(0):
        if view.ready_since is None:
            return False, None
        back_at = view.ready_since + min_ready
        if now < back_at:
            return False, back_at
    return True, None


def _aborted(state: NodeProtocolState) -> bool:
    """The agent gave up on its grant: not in progress, still needing a reboot, with a reason.

    GrantRebootOk clears blocked-reason, so a reason seen while reboot-ok=true is fresh.
    """
    return (
        state.reboot_ok
        and state.reboot_needed
        and not state.reboot_in_progress
        and bool(state.blocked_reason.strip())
    )


def ignored_while_unslotted(view: NodeView | None) -> bool:
    """Whether ``plan`` ignores this node (or its absence) as long as no slot names it.

    Such a node adds no change, is not in flight and is not queued: the plan is the same
    with or without it. So a change between two ignored states (an agent refreshing
    ``last-checked-time``, a kubelet status report) cannot change any plan, and the driver
    need not plan again for it. A node that is unavailable (NotReady, cordoned, being
    deleted) is never ignored: it counts against ``max_unavailable`` and the control-plane
    rule (rule 15). Nodes coming and going, and their labels, change the totals a
    percentage budget is taken of (see ``counts_every_node``).
    """
    return view is None or (_untouched(view.state) and not _unavailable_reason(view))


def counts_every_node(policy: Policy) -> bool:
    """Whether a node's coming, going or labels matter to the plan even while the planner
    ignores it otherwise: with a max-unavailable (of all the nodes, or of a group's) they
    change the total a percentage is taken of, and the total the hold reason names."""
    groups = policy.groups
    budgets = [policy.max_unavailable, groups.max_unavailable,
               *(spec.max_unavailable for spec in groups.specs)]
    return any(budget is not None for budget in budgets)


def _untouched(state: NodeProtocolState) -> bool:
    """A node no slot names that neither needs a reboot nor shows any part of a cycle.

    ``_tidy_unslotted`` has nothing to do for it, it is not in flight and it is no
    candidate: each of those needs one of these flags.
    """
    return not (
        state.reboot_needed
        or state.reboot_ok
        or state.reboot_in_progress
        or state.release_slot
        or state.before_reboot
        or state.after_reboot
        or state.agent_made_unschedulable
        or has_drain_failures(state)
    )


def has_drain_failures(state: NodeProtocolState) -> bool:
    """The node carries a drain failure record (rule 13), even a partial one."""
    return state.drain_failures > 0 or state.drain_retry_at is not None


def drain_backoff_until(state: NodeProtocolState, policy: Policy, now: datetime
                        ) -> tuple[bool, datetime | None]:
    """Rule 13 for a node that would take a slot: whether a failed drain keeps it out
    now, and until when (None: until an admin clears it, or not at all)."""
    if state.drain_failures >= policy.max_drain_attempts:
        return True, None
    if state.drain_failures and state.drain_retry_at is not None and now < state.drain_retry_at:
        return True, state.drain_retry_at
    return False, None


def _failed_drain(view: NodeView, policy: Policy, now: datetime) -> tuple[DrainBackoff, str]:
    """Rule 13: the backoff to record for a drain that just failed, and what to say."""
    state = view.state
    failures = state.drain_failures + 1
    reason = state.blocked_reason.strip()
    if failures >= policy.max_drain_attempts:
        return DrainBackoff(failures, None), (
            f"Drain attempt {failures} of {policy.max_drain_attempts} failed: {reason}. The "
            f"node is out of the roll until an admin clears it: cluo-coord retry {view.name} "
            f"(or kubectl annotate node {view.name} {policy.keys.drain_failures}-).")
    backoff = Backoff(initial=policy.drain_backoff.total_seconds(),
                      maximum=policy.drain_backoff_max.total_seconds())
    retry_at = now + timedelta(seconds=backoff.delay(failures))
    return DrainBackoff(failures, retry_at), (
        f"Drain attempt {failures} of {policy.max_drain_attempts} failed: {reason}. Next "
        f"attempt not before {seconds_time(retry_at)}; other nodes go first.")


def _clear_drain_failures(view: NodeView) -> DrainBackoff | None:
    """A reboot done (or no longer needed) ends the node's drain failure record."""
    return NO_DRAIN_FAILURES if has_drain_failures(view.state) else None


def cordoned_by_cluo(view: NodeView) -> bool:
    """The node is unschedulable because the agent cordoned it (rules 1 and 10)."""
    return view.unschedulable and view.state.agent_made_unschedulable


def _counts_in_flight(view: NodeView) -> bool:
    """Rule 1 for a node no slot names."""
    state = view.state
    return (
        state.reboot_ok or state.reboot_in_progress or cordoned_by_cluo(view)
    ) and not state.release_slot


def _is_candidate(view: NodeView) -> bool:
    """May this node (which holds no slot) take one? Pauses and windows are checked later."""
    state = view.state
    return (
        state.reboot_needed
        and not state.reboot_ok
        and not state.reboot_in_progress
        and not state.reboot_paused
        and not state.release_slot
        and not state.before_reboot
        and not state.after_reboot
        and not state.complaints
        and view.ready
        and bool(view.boot_id)
    )


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be a timezone-aware datetime, got naive {now!r}")


# --------------------------------------------------------------------------- planning


class _Builder:
    """Collects changes and wake-up times while the planner walks the cluster."""

    def __init__(self, now: datetime, policy: Policy, health: Health = ALL_CLEAR) -> None:
        self.now = now
        self.policy = policy
        self.health = health
        self.changes: list[Change] = []
        self.wake_times: list[datetime] = []
        self.holds: list[str] = []
        self.failures: list[FailedReboot] = []  # rule 14: recorded by this plan
        self.roll = _Roll({}, set(), {}, {}, set())  # rule 15: set by plan
        self.pause_reason = ""  # rule 14: this plan pauses the roll
        self.handing: dict[int, _Handing] = {}  # global slots a finished cycle frees

    def add(self, *changes: Change) -> None:
        self.changes.extend(changes)

    def wake_at(self, when: datetime | None) -> None:
        if when is not None:
            self.wake_times.append(when)

    def event(self, node: str, type_: EventType, reason: Reason, message: str) -> None:
        self.changes.append(EmitEvent(node, type_, reason, message))

    def failed_reboot(self, node: str, why: str) -> None:
        """Rule 14: put a failed reboot proof on the brake's record (once per node)."""
        if self.policy.max_failed_reboots <= 0 or node in self.policy.failed_reboots:
            return
        if any(failure.node == node for failure in self.failures):
            return
        failure = FailedReboot(node, why, self.now)
        self.failures.append(failure)
        self.add(RecordFailedReboot(failure))

    def hold(self, reason: str) -> None:
        """Record what keeps queued nodes from a free slot (``Plan.holds``)."""
        self.holds.append(reason)

    def reset_and_release(
        self, view: NodeView, slots: list[SlotLease], type_: EventType, reason: Reason,
        message: str, *, clear_release_slot: bool = False,
        drain_backoff: DrainBackoff | None = None, done: bool = False,
        uncordon: bool = False, reports: Sequence[_Report] = (),
    ) -> None:
        """Rule 4: reboot-ok=false first (a CAS even when nothing changes), then release;
        then the Event that reports it. ``done``: the holder's cycle ended (it no longer
        needs a reboot); its one global slot may go straight to the next node
        (``_handed``), and the reset removes the agent's boot id. ``uncordon``: the reset
        uncordons the node the agent cordoned (rule 10). ``reports``: Events that report
        the reset itself."""
        self.add(
            ResetRebootOk(
                view.name,
                view.resource_version,
                self.policy.hook_annotations,
                clear_release_slot=clear_release_slot,
                drain_backoff=drain_backoff,
                uncordon=uncordon,
                finished=done,
            )
        )
        for report in reports:
            self.event(view.name, report.type, report.reason, report.message)
        releases: dict[str, tuple[SlotLease, Change]] = {}  # group ("": global) -> its
        for lease in slots:
            release = ReleaseSlot(lease.index, view.name, _lease_rv(lease), self.now,
                                  group=lease.group)
            self.add(release)
            releases.setdefault(lease.group, (lease, release))
        self.event(view.name, type_, reason, message)
        # One global slot, at most one of each group: what a fresh take would hold.
        if (done and len(releases) == len(slots) and "" in releases
                and _free_after_reset(view, uncordoned=uncordon)):
            primary, freed = releases.pop("")
            self.handing[primary.index] = _Handing(view.name, primary, freed,
                                                   self.changes[-1], releases)

    def hand_over(self, index: int, groups: Iterable[str] = ()) -> None:
        """The hand-over of global slot ``index``, and of the holder's slots of
        ``groups``, was just added: it replaces the holder's ReleaseSlots of those, and
        the Event that reported the release now follows it."""
        handing = self.handing.pop(index)
        gone = {id(handing.release), id(handing.event),
                *(id(handing.groups[group][1]) for group in groups)}
        self.changes = [change for change in self.changes if id(change) not in gone]
        self.changes.append(handing.event)

    def recheck_after(self) -> timedelta | None:
        if not self.wake_times:
            return None
        return max(min(self.wake_times) - self.now, timedelta(0))


@dataclass(frozen=True)
class _Handing:
    """A global slot this plan releases at the end of its holder's cycle: the Lease as
    the view has it, and the ReleaseSlot and Event a hand-over replaces; ``groups``: the
    holder's group slots (group -> the Lease and its ReleaseSlot), handed over with the
    global one to a taker that needs a slot of that group, else released."""

    holder: str
    lease: SlotLease
    release: Change
    event: Change
    groups: Mapping[str, tuple[SlotLease, Change]] = field(default_factory=dict)


def _free_after_reset(view: NodeView, *, uncordoned: bool = False) -> bool:
    """Once its reset is written (``uncordoned``: a reset that uncordons it), the holder
    no longer counts in flight but for its slot (rule 1: no grant, no reboot in progress,
    not cordoned by cluo, rule 10) and queues for no new one (it needs no reboot)."""
    state = view.state
    return not (state.reboot_needed or state.reboot_in_progress or state.release_slot
                or (cordoned_by_cluo(view) and not uncordoned))


def _lease_rv(lease: SlotLease) -> str:
    if lease.resource_version is None:  # excluded by _index_slots for held slots
        raise ValueError(f"slot {lease.index} has a holder but no resource version")
    return lease.resource_version


def plan(
    nodes: Iterable[NodeView],
    leases: Iterable[SlotLease],
    now: datetime,
    policy: Policy,
    *,
    health: Health = ALL_CLEAR,
) -> Plan:
    """Decide the next changes from the whole cluster state. Pure and deterministic.

    ``nodes`` may be a ``NodeIndex`` (the cluster cache keeps one); other views are
    indexed first. Then one pass over the nodes in a cycle (``NodeIndex.active``) and the
    slot holders, plus sorting the queue: a plan's own work grows with the nodes in a
    cycle, not with the cluster's size.

    ``health`` (cluo_coord.health; default: nothing fires, every gate open): a blocker
    that fires holds new slots as the pause does (rule 6: holders finish), one
    ``Plan.holds`` entry "blocker: ..." each; a holder whose health gate is closed keeps
    its slot where a finished cycle would release it, until the gate opens (past
    ``reboot_timeout`` it is marked stuck, rule 7).
    """
    _require_aware(now)
    index = NodeIndex.of(nodes)
    views = index.by_name
    leases = tuple(leases)
    slots = _index_slots(leases, policy.max_concurrent)
    held = _holdings(slots.values())
    group_slots = _index_group_slots(leases)
    group_held = _holdings(lease for by_index in group_slots.values()
                           for lease in by_index.values())
    out = _Builder(now, policy, health)
    in_flight = set(held)
    out.roll = roll = _Roll(views, in_flight, group_slots, group_held, set(held),
                            reasons=dict(index.unavailable), active=index.active)

    for name in sorted(held, key=lambda holder: held[holder][0].index):
        _advance_holder(name, held[name] + group_held.get(name, []), views.get(name), out)

    # One pass over the nodes no slot names. Most of them, in a large cluster, are in no
    # cycle at all (``_untouched``): nothing to tidy, not in flight, not queued; the
    # index leaves them out (``NodeIndex.active``).
    candidates: list[NodeView] = []
    backing_off: list[str] = []
    out_of_roll: list[str] = []
    for name in sorted((index.active | group_held.keys()) - held.keys()):
        view = views.get(name)
        if view is None:  # a gone holder of group slots only: below
            continue
        changes_before = len(out.changes)
        _tidy_unslotted(view, out)
        queued = False
        if _counts_in_flight(view):
            in_flight.add(name)
        elif _is_candidate(view):
            waits, until = drain_backoff_until(view.state, policy, now)
            if not waits:
                candidates.append(view)
                queued = True
            elif until is None:
                out_of_roll.append(name)
            else:
                backing_off.append(name)
                out.wake_at(until)
        if (name in group_held and not queued and name not in in_flight
                and len(out.changes) == changes_before and _gives_back(view, policy)):
            _release_group_slots(view, group_held[name], out)
    for name in sorted(name for name in group_held.keys() - held.keys() if name not in views):
        _free_slots_of_gone_node(name, group_held[name], out)
    queue = sorted(candidates, key=queue_key)
    _apply_brake(out)
    _take_free_slots(roll.waiting + queue, slots, len(in_flight), out)

    return Plan(
        changes=tuple(out.changes),
        recheck_after=out.recheck_after(),
        in_flight=tuple(sorted(in_flight)),
        queue=tuple(view.name for view in queue),
        drain_backoff=tuple(backing_off),
        out_of_roll=tuple(out_of_roll),
        holds=tuple(out.holds),
        unavailable=tuple(sorted(set(roll.reasons) | in_flight)),
        groups=_group_counts(roll, policy, in_flight, queue),
    )


def _group_counts(roll: _Roll, policy: Policy, in_flight: set[str], queue: list[NodeView]
                  ) -> tuple[tuple[str, int, int], ...]:
    """Rule 15, for metrics: each group's nodes in flight and queued."""
    counts: dict[str, list[int]] = {}
    for name in in_flight:
        if name in roll.views:
            counts.setdefault(roll.group_of(roll.views[name], policy), [0, 0])[0] += 1
    for view in queue:
        counts.setdefault(roll.group_of(view, policy), [0, 0])[1] += 1
    return tuple((group, busy, queued) for group, (busy, queued) in sorted(counts.items()))


class NodeIndex(tuple[NodeView, ...]):
    """The planner's nodes: every view, in name order (the index is that tuple), with the
    facts ``plan`` needs of each that no policy changes, so that a plan visits the nodes
    in a cycle instead of all of them.

    ``by_name``: each view by name; ``active``: the nodes whose state shows any part of a
    cycle (``_untouched`` is false: the only ones the pass over unslotted nodes looks
    at); ``unavailable``: node -> why, for those unavailable for a reason of their own
    (``_unavailable_reason``: NotReady, cordoned, being deleted; rule 15);
    ``reboot_needed``: how many need a reboot (for metrics).

    ``NodeIndex.of(views)`` indexes from scratch; ``updated`` derives the next index from
    this one and the views that changed (the cluster cache does, per snapshot): the facts
    are computed for the changed nodes only, and the name map is copied at C speed, so an
    index never changes once made. Both ways give the same index.
    """

    by_name: Mapping[str, NodeView]
    active: frozenset[str]
    unavailable: Mapping[str, str]
    reboot_needed: int

    def __new__(cls, ordered: Iterable[NodeView], by_name: Mapping[str, NodeView],
                active: frozenset[str], unavailable: Mapping[str, str],
                reboot_needed: int) -> NodeIndex:
        index = super().__new__(cls, ordered)
        index.by_name, index.active = by_name, active
        index.unavailable, index.reboot_needed = unavailable, reboot_needed
        return index

    @classmethod
    def of(cls, nodes: Iterable[NodeView]) -> NodeIndex:
        """``nodes`` indexed from scratch (an index is returned as it is)."""
        if isinstance(nodes, NodeIndex):
            return nodes
        listed = tuple(nodes)
        by_name = {view.name: view for view in listed}
        if len(by_name) != len(listed):
            seen: set[str] = set()
            for view in listed:
                if view.name in seen:
                    raise ValueError(f"node {view.name!r} appears twice in the planner's input")
                seen.add(view.name)
        return cls._indexed(sorted(listed, key=lambda view: view.name), by_name)

    @classmethod
    def _indexed(cls, ordered: Iterable[NodeView], by_name: dict[str, NodeView]) -> NodeIndex:
        active: set[str] = set()
        unavailable: dict[str, str] = {}
        needed = 0
        for name, view in by_name.items():
            _index_facts(name, view, active, unavailable)
            needed += view.state.reboot_needed
        return cls(ordered, by_name, frozenset(active), unavailable, needed)

    def updated(self, ordered: Iterable[NodeView],
                changes: Iterable[tuple[str, NodeView | None, NodeView | None]]) -> NodeIndex:
        """The index of ``ordered`` (every view, in name order), which differs from this
        index's nodes by ``changes``: (name, view before, view after; None: absent)."""
        by_name = dict(self.by_name)
        active, unavailable = set(self.active), dict(self.unavailable)
        needed = self.reboot_needed
        for name, before, after in changes:
            if before is not None:
                needed -= before.state.reboot_needed
            active.discard(name)
            unavailable.pop(name, None)
            if after is None:
                by_name.pop(name, None)
                continue
            by_name[name] = after
            _index_facts(name, after, active, unavailable)
            needed += after.state.reboot_needed
        return NodeIndex(ordered, by_name, frozenset(active), unavailable, needed)


def _index_facts(name: str, view: NodeView, active: set[str], unavailable: dict[str, str]
                 ) -> None:
    if not _untouched(view.state):
        active.add(name)
    if why := _unavailable_reason(view):
        unavailable[name] = why


def _index_slots(leases: Iterable[SlotLease], max_concurrent: int) -> dict[int, SlotLease]:
    """All slot Leases by index, with the missing ones below max_concurrent as free slots."""
    slots: dict[int, SlotLease] = {}
    for lease in leases:
        if lease.group:  # rule 15: _index_group_slots
            continue
        if lease.index < 0:
            raise ValueError(f"slot index must not be negative, got {lease.index}")
        if lease.index in slots:
            raise ValueError(f"slot {lease.index} appears twice in the planner's input")
        if lease.holder and lease.resource_version is None:
            raise ValueError(
                f"slot {lease.index} names {lease.holder!r} but has no resource version"
            )
        slots[lease.index] = lease
    for index in range(max_concurrent):
        slots.setdefault(index, SlotLease(index))
    return slots


def _index_group_slots(leases: Iterable[SlotLease]) -> dict[str, dict[int, SlotLease]]:
    """Rule 15: the group slot Leases, by group and index."""
    groups: dict[str, dict[int, SlotLease]] = {}
    for lease in leases:
        if not lease.group:
            continue
        by_index = groups.setdefault(lease.group, {})
        if lease.index < 0 or lease.index in by_index:
            raise ValueError(f"slot {lease.index} of group {lease.group!r} is negative or "
                             "appears twice in the planner's input")
        if lease.holder and lease.resource_version is None:
            raise ValueError(f"slot {lease.index} of group {lease.group!r} names "
                             f"{lease.holder!r} but has no resource version")
        by_index[lease.index] = lease
    return groups


def _gives_back(view: NodeView, policy: Policy) -> bool:
    """Rule 15: a node that holds only group slots gives them back when it shows no part
    of a cycle and, from the same Node version, a holder of a global slot too would
    release (it no longer needs a reboot, an admin released it, it is out of the roll):
    a plan from another view of the Leases can then neither label nor grant it from that
    version. Otherwise (NotReady, paused, backing off) it keeps them until it queues, and
    queued, until the walk takes its global slot or holds it back (``_give_back_held_back``)."""
    state = view.state
    no_cycle = not (state.reboot_ok or state.reboot_in_progress or state.before_reboot
                    or state.after_reboot or cordoned_by_cluo(view))
    return no_cycle and (not state.reboot_needed or state.release_slot
                         or state.drain_failures >= policy.max_drain_attempts)


def _release_group_slots(view: NodeView, slots: list[SlotLease], out: _Builder) -> None:
    """Rule 15: a node that holds only group slots and shows no part of a cycle gives them
    back: a reset first (a no-op: the node still shows no cycle), as rule 4 says."""
    out.add(ResetRebootOk(view.name, view.resource_version, out.policy.hook_annotations))
    for lease in slots:
        out.add(ReleaseSlot(lease.index, view.name, _lease_rv(lease), out.now,
                            group=lease.group))


def _holdings(slots: Iterable[SlotLease]) -> dict[str, list[SlotLease]]:
    """Node name -> the slots naming it, primary (first taken, then lowest index) first."""
    held: dict[str, list[SlotLease]] = {}
    for lease in slots:
        if lease.holder:
            held.setdefault(lease.holder, []).append(lease)
    never = datetime.max.replace(tzinfo=UTC)
    for leases in held.values():
        leases.sort(key=lambda lease: (lease.acquired_at or never, lease.index))
    return held


def _advance_holder(
    name: str, slots: list[SlotLease], view: NodeView | None, out: _Builder
) -> None:
    """One step of the cycle of a node a slot names (rules 4, 5, 7)."""
    primary = slots[0]
    policy = out.policy
    if view is None:
        _free_slots_of_gone_node(name, slots, out)
        return
    state = view.state

    if state.release_slot:
        out.reset_and_release(
            view, slots, EventType.NORMAL, Reason.RELEASED_BY_ADMIN,
            f"An admin set {policy.keys.release_slot}=true: reboot slot {primary.index} "
            "released; the node no longer counts against the limit.",
            clear_release_slot=_release_slot_done(view),
        )
        return

    if primary.holder_uid and view.uid and view.uid != primary.holder_uid:
        _release_replaced_node(view, slots, out)
        return

    if state.reboot_paused and _before_its_reboot(view, primary):
        _cancel_paused(view, slots, out)
        return

    if state.after_reboot:
        if state.reboot_in_progress:
            # The agent took the grant that is still out for a new drain (a new update
            # arrived during the after-reboot phase): that attempt must finish first.
            _wait(name, primary, "the agent started another reboot during the after-reboot phase",
                  out)
        elif hooks_done(policy.after_reboot_annotations, view.annotations):
            _finish_proven(view, slots, out)
        else:
            _wait(name, primary, "waiting for the after-reboot hooks", out)
        return

    if state.reboot_ok:
        proven, back_at = reboot_proven(view, primary.holder_boot_id, policy, out.now)
        if proven:
            rolled_back = older_version(view.os_version, primary.announced_version)
            if rolled_back:
                out.failed_reboot(name, f"came back on {view.os_version}, older than the "
                                        f"announced {primary.announced_version}")
            hooks = policy.after_reboot_annotations
            proof = [_Report(EventType.NORMAL, Reason.REBOOT_VERIFIED,
                             f"The node is back with boot id {view.boot_id}; "
                             + ("running after-reboot hooks." if hooks
                                else "no after-reboot hooks."))]
            if rolled_back:
                proof.append(_Report(
                    EventType.WARNING, Reason.REBOOT_ROLLED_BACK,
                    f"The node came back on version {view.os_version}, older than the "
                    f"{primary.announced_version} it announced when it took reboot slot "
                    f"{primary.index}: the update did not boot and was rolled back."))
            if not hooks:
                # No after-reboot hooks, no after-reboot label: the cycle ends with the
                # proof, as a grant follows the slot without before-reboot hooks.
                _finish_proven(view, slots, out, proof=proof)
                return
            out.add(LabelAfterReboot(name, view.resource_version, hooks))
            for report in proof:
                out.event(name, report.type, report.reason, report.message)
        elif _aborted(state) and cordoned_by_cluo(view):
            # Rule 10: the grant stays out (so the node still reads as an abort) until
            # the agent has uncordoned it.
            _wait(name, primary, "the agent gave up; waiting for it to uncordon the node", out)
        elif _aborted(state):
            backoff, message = _failed_drain(view, policy, out.now)
            out.reset_and_release(
                view, slots, EventType.WARNING, Reason.DRAIN_BLOCKED,
                f"{message} Reboot slot {primary.index} released for the next node.",
                drain_backoff=backoff,
            )
        else:
            out.wake_at(back_at)
            _wait(name, primary, "granted; waiting for the node to drain, reboot and come back",
                  out, failure=_unproven_reboot(view, primary, policy))
        return

    if state.reboot_in_progress:
        _wait(name, primary, "the agent reports a reboot in progress this slot did not grant",
              out)
    elif not state.reboot_needed and cordoned_by_cluo(view):
        _wait(name, primary, "waiting for the agent to uncordon the node", out)
    elif not state.reboot_needed and not view.ready:
        _wait(name, primary, "the node no longer needs a reboot but is not Ready", out)
    elif (not state.reboot_needed and _rebooted(view, primary)
          and (unrecovered := out.health.gate(name)) is not None):
        _wait(name, primary, f"waiting for the workloads to recover: {unrecovered}", out)
    elif not state.reboot_needed:
        rebooted = _rebooted(view, primary)
        out.reset_and_release(
            view, slots, EventType.NORMAL,
            Reason.REBOOT_FINISHED if rebooted else Reason.REBOOT_CANCELLED,
            (f"The node rebooted and is schedulable again; reboot slot {primary.index} "
             "released.") if rebooted else
            f"The node no longer needs a reboot; reboot slot {primary.index} released.",
            drain_backoff=_clear_drain_failures(view), done=True,
        )
    elif not state.before_reboot and drain_backoff_until(state, policy, out.now)[0]:
        # Rule 5's abort case, now told apart: the reset recorded a drain failure and the
        # release did not happen. The slot goes to the next node; this one waits.
        out.reset_and_release(
            view, slots, EventType.NORMAL, Reason.DRAIN_BLOCKED,
            f"The node's last drain failed ({policy.keys.drain_failures}="
            f"{state.drain_failures}); reboot slot {primary.index} released for the next node.",
        )
    elif not state.before_reboot and policy.before_reboot_annotations:
        out.add(LabelBeforeReboot(name, view.resource_version, policy.before_reboot_annotations))
    elif missing := _missing_group_slots(view, slots, out):
        # Rule 15: no grant without a slot of the node's group (a group configured or a
        # label changed since it took its global slot); the grant walk gives it one.
        out.roll.waiting.append(view)
        _wait(name, primary, f"waiting for a slot of {', '.join(missing)}", out)
    elif hooks_done(policy.before_reboot_annotations, view.annotations):
        # Without hooks the before-reboot label is never written: the grant follows the
        # slot (a crash between the two resumes here).
        _grant_holder(view, primary.index, _lease_rv(primary),
                      [lease for lease in slots if lease.group], out)
    else:
        _wait(name, primary, "waiting for the before-reboot hooks", out)


@dataclass(frozen=True)
class _Report:
    """An Event a change of this plan reports (``_Builder.event``'s arguments)."""

    type: EventType
    reason: Reason
    message: str


def _finish_proven(view: NodeView, slots: list[SlotLease], out: _Builder, *,
                   proof: Sequence[_Report] = ()) -> None:
    """A holder whose reboot is proven and whose after-reboot hooks are done: reset; the
    reset uncordons the node the agent cordoned (rule 10), so the release (or the
    hand-over) follows in this plan, unless the health gate holds the slot. ``proof``:
    the proof's Events, when the proof is made in this plan (no after-reboot hooks, so no
    after-reboot label: the reset is this plan's write for it, rule 14's record before it)."""
    name = view.name
    primary = slots[0]
    policy = out.policy
    uncordon = cordoned_by_cluo(view)
    if (unrecovered := out.health.gate(name)) is not None:
        if uncordon or proof:  # the workloads may need the node to come back
            out.add(ResetRebootOk(name, view.resource_version, policy.hook_annotations,
                                  uncordon=uncordon, finished=True))
            for report in proof:
                out.event(name, report.type, report.reason, report.message)
        _wait(name, primary, f"waiting for the workloads to recover: {unrecovered}", out)
        return
    hooks = "After-reboot hooks done" if policy.after_reboot_annotations else (
        "No after-reboot hooks")
    out.reset_and_release(
        view, slots, EventType.NORMAL, Reason.REBOOT_FINISHED,
        f"{hooks}: {policy.keys.reboot_ok}=false{', node uncordoned' if uncordon else ''}, "
        f"reboot slot {primary.index} released.",
        drain_backoff=_clear_drain_failures(view), done=True, uncordon=uncordon,
        reports=proof,
    )


def _grant_holder(view: NodeView, slot: int, lease_version: str, group_slots: list[SlotLease],
                  out: _Builder, *, after_acquire: bool = False, taken: bool = False) -> None:
    """GrantRebootOk for a holder of global slot ``slot`` and of ``group_slots`` (rule 15),
    and the Events that report it (with ``taken``, the slot's too: taken in this plan)."""
    policy = out.policy
    out.add(GrantRebootOk(
        view.name, slot, view.resource_version, lease_version, policy.before_reboot_annotations,
        group_slots=tuple((lease.group, lease.index, _lease_rv(lease)) for lease in group_slots),
        after_acquire=after_acquire))
    if taken:
        out.event(view.name, EventType.NORMAL, Reason.SLOT_ACQUIRED,
                  f"Reboot slot {slot} taken; no before-reboot hooks.")
    hooks = ("Before-reboot hooks done" if policy.before_reboot_annotations
             else "No before-reboot hooks")
    out.event(view.name, EventType.NORMAL, Reason.REBOOT_APPROVED,
              f"{hooks}: {policy.keys.reboot_ok}=true; the agent may drain and reboot the node.")


def _rebooted(view: NodeView, primary: SlotLease) -> bool:
    """The holder runs another boot than the one it took its slot in."""
    return bool(view.boot_id) and view.boot_id != primary.holder_boot_id


def _free_slots_of_gone_node(name: str, slots: list[SlotLease], out: _Builder) -> None:
    """Rule 11: the holder's Node is deleted; its slots go to the next nodes."""
    for lease in slots:
        out.add(ReleaseSlot(lease.index, name, _lease_rv(lease), out.now, holder_gone=True,
                            group=lease.group))
    out.add(EmitEvent(
        name, EventType.WARNING, Reason.HOLDER_GONE,
        f"Node {name} was deleted while it held reboot slot {slots[0].index}: the slot is "
        "free for the next node.",
        slot=slots[0].index,
    ))


def _release_replaced_node(view: NodeView, slots: list[SlotLease], out: _Builder) -> None:
    """Rule 11: the Node was re-created; release once the new one is back."""
    primary = slots[0]
    state = view.state
    ready, ready_at = _ready_for(view, out.policy.min_ready, out.now)
    if not ready or state.reboot_in_progress or cordoned_by_cluo(view):
        out.wake_at(ready_at)
        _wait(view.name, primary, "the Node was re-created and the new one is not back yet",
              out)
        return
    out.reset_and_release(
        view, slots, EventType.WARNING, Reason.HOLDER_REPLACED,
        f"The Node was deleted and re-created (uid {primary.holder_uid} -> {view.uid}) "
        f"while it held reboot slot {primary.index}; the new node is Ready, so the slot is "
        "released. It queues like any other node if it needs a reboot.",
    )


def _before_its_reboot(view: NodeView, primary: SlotLease) -> bool:
    """Rule 12: the holder's reboot has not begun, so its grant may still be cancelled."""
    state = view.state
    return (
        state.reboot_needed
        and not state.after_reboot
        and not state.boot_id_before_reboot
        and (not primary.holder_boot_id or view.boot_id == primary.holder_boot_id)
    )


def _cancel_paused(view: NodeView, slots: list[SlotLease], out: _Builder) -> None:
    """Rule 12: withdraw the grant of a paused holder; release once the agent let go."""
    primary = slots[0]
    state = view.state
    keys = out.policy.keys
    if state.reboot_in_progress or cordoned_by_cluo(view):
        if state.reboot_ok or state.before_reboot:
            out.add(ResetRebootOk(view.name, view.resource_version, out.policy.hook_annotations))
            out.event(
                view.name, EventType.NORMAL, Reason.REBOOT_CANCELLED,
                f"{keys.reboot_paused}=true: grant withdrawn ({keys.reboot_ok}=false); "
                f"reboot slot {primary.index} is released once the agent has stopped and "
                "uncordoned the node.",
            )
        _wait(view.name, primary, "paused: waiting for the agent to stop and uncordon the node",
              out)
        return
    out.reset_and_release(
        view, slots, EventType.NORMAL, Reason.REBOOT_CANCELLED,
        f"{keys.reboot_paused}=true: grant cancelled ({keys.reboot_ok}=false, before-reboot "
        f"label and hook annotations removed), reboot slot {primary.index} released.",
    )


def _release_slot_done(view: NodeView) -> bool:
    """An admin's release-slot has done its work: nothing of the cycle is left on the
    node that would count it in flight again (rule 7)."""
    return not view.state.reboot_in_progress and not cordoned_by_cluo(view)


def _wait(holder: str, primary: SlotLease, doing: str, out: _Builder, *,
          failure: str = "") -> None:
    """A holder with nothing to do now: report it once if it is over its time (rule 7);
    ``failure`` says why that is a failed reboot proof (rule 14), if it is one."""
    policy = out.policy
    if primary.stuck:
        return
    deadline = (primary.acquired_at or out.now) + policy.reboot_timeout
    if primary.acquired_at is not None and out.now < deadline:
        out.wake_at(deadline)
        return
    if failure:
        out.failed_reboot(holder, failure)
    out.add(MarkStuck(primary.index, holder, _lease_rv(primary)))
    out.event(
        holder, EventType.WARNING, Reason.REBOOT_TIMED_OUT,
        f"Reboot slot {primary.index} was taken more than {policy.reboot_timeout} ago and "
        f"the node is not done ({doing}). It keeps the slot so a bad update cannot spread; "
        f"to release it: kubectl annotate node {holder} {policy.keys.release_slot}=true",
    )


def _unproven_reboot(view: NodeView, primary: SlotLease, policy: Policy) -> str:
    """Rule 14: why a granted holder that is not back at its timeout failed the proof."""
    timeout = f"within --reboot-timeout ({policy.reboot_timeout})"
    before = {boot for boot in (primary.holder_boot_id, view.state.boot_id_before_reboot)
              if boot}
    if view.boot_id and before and view.boot_id not in before:
        if not view.ready:
            return f"came back (a new boot id) but was not Ready {timeout}"
        return f"came back (a new boot id) but was not proven back {timeout}"
    return f"did not come back {timeout}"


def _apply_brake(out: _Builder) -> None:
    """Rule 14: pause the roll once ``max_failed_reboots`` nodes failed the proof."""
    policy = out.policy
    limit = policy.max_failed_reboots
    failed = sorted(policy.failed_reboots | {failure.node for failure in out.failures})
    if limit <= 0 or policy.paused or len(failed) < limit:
        return
    out.pause_reason = (f"{len(failed)} node(s) failed the reboot proof, the limit is {limit} "
                        f"(--max-failed-reboots): {', '.join(failed)}")
    out.add(PauseRoll(out.pause_reason, out.now))
    node = out.failures[-1].node if out.failures else failed[-1]
    out.event(node, EventType.WARNING, Reason.ROLL_PAUSED,
              f"The roll is paused: {out.pause_reason}. No node gets a new reboot slot until "
              "an admin resumes it: cluo-coord resume (which also clears the record).")


def _tidy_unslotted(view: NodeView, out: _Builder) -> None:
    """A node no slot names: admin releases, grants from older coordinators, leftovers."""
    state = view.state
    policy = out.policy
    leftover_labels = state.before_reboot or state.after_reboot

    if state.release_slot:
        done = _release_slot_done(view)
        if state.reboot_ok or leftover_labels or done:
            out.add(
                ResetRebootOk(
                    view.name, view.resource_version, policy.hook_annotations,
                    clear_release_slot=done,
                )
            )
        # Still in progress or cordoned by cluo: keep release-slot (the node stays out of
        # the count) until the agent has cleared reboot-in-progress and uncordoned it.
        return

    if state.reboot_ok:
        # A grant no slot backs (CLUO, an older coordinator, a hand edit). It counts as
        # in flight; finish it the CLUO way, without taking a slot for it.
        if state.after_reboot:
            if not state.reboot_in_progress and hooks_done(
                policy.after_reboot_annotations, view.annotations
            ):
                out.add(ResetRebootOk(view.name, view.resource_version, policy.hook_annotations))
                out.event(
                    view.name, EventType.NORMAL, Reason.REBOOT_FINISHED,
                    f"After-reboot hooks done: {policy.keys.reboot_ok}=false.",
                )
            return
        proven, back_at = reboot_proven(view, "", policy, out.now, accept_unknown_boot=True)
        if proven:
            out.add(
                LabelAfterReboot(view.name, view.resource_version, policy.after_reboot_annotations)
            )
        elif _aborted(state):
            backoff, message = _failed_drain(view, policy, out.now)
            out.add(ResetRebootOk(view.name, view.resource_version, policy.hook_annotations,
                                  drain_backoff=backoff))
            out.event(view.name, EventType.WARNING, Reason.DRAIN_BLOCKED,
                      f"{message} Grant withdrawn.")
        else:
            out.wake_at(back_at)
        return

    if leftover_labels:
        # A before/after-reboot label without a grant or a slot: left over from an
        # interrupted cycle or another coordinator. Remove it; the node queues normally.
        out.add(ResetRebootOk(view.name, view.resource_version, policy.hook_annotations))
    elif not state.reboot_needed and not state.reboot_in_progress and has_drain_failures(state):
        # Rule 13: the node no longer needs the reboot its drains failed for.
        out.add(ResetRebootOk(view.name, view.resource_version, policy.hook_annotations,
                              drain_backoff=NO_DRAIN_FAILURES))


def _take_free_slots(
    queue: list[NodeView],
    slots: Mapping[int, SlotLease],
    in_flight: int,
    out: _Builder,
) -> None:
    """Give free slots to the head of the queue (rules 1 and 6)."""
    policy = out.policy
    now = out.now
    if not queue:
        return
    if policy.paused:
        out.hold("paused: the roll is paused, no new reboot slots are granted")
        return
    if out.pause_reason:
        out.hold(f"paused: the brake paused the roll: {out.pause_reason}")
        return
    if not policy.windows.is_open(now):
        out.hold("window: outside every reboot window")
        out.wake_at(policy.windows.next_change(now))
        return
    if out.health.blockers:  # cluo_coord.health: holders finish, nobody new starts
        for blocker in out.health.blockers:
            out.hold(f"blocker: {blocker}")
        return
    _grant(queue, slots, in_flight, out)


# --------------------------------------------------------------------------- rule 15


@dataclass
class _Roll:
    """What the grant walk counts besides the global slots (rule 15), built by ``plan``.

    ``group_slots``: every group's slot Leases by group (the control-plane slot under
    ``CONTROL_PLANE_SLOTS``), the missing ones below the group's count as free slots;
    ``group_held``: node -> the group slots naming it; ``waiting``: holders of a global
    slot that still need a slot of their group before their grant.
    """

    views: Mapping[str, NodeView]
    in_flight: set[str]
    group_slots: dict[str, dict[int, SlotLease]]
    group_held: dict[str, list[SlotLease]]
    global_held: set[str]
    waiting: list[NodeView] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # unavailable node -> why
    active: frozenset[str] = frozenset()  # NodeIndex.active
    _groups: dict[str, str] = field(default_factory=dict)

    def group_of(self, view: NodeView, policy: Policy) -> str:
        group = self._groups.get(view.name)
        if group is None:
            group = self._groups[view.name] = policy.groups.group_of(
                view.labels, policy.keys.group)
        return group


def _group_limits(policy: Policy, group: str, total: Callable[[], int]
                  ) -> tuple[int | None, Budget | None]:
    """A group's slot count (None: the group takes no slots) and its max-unavailable."""
    if group == CONTROL_PLANE_SLOTS:
        return 1, None
    most, budget = policy.groups.limits(group)
    counts = [count for count in (most, budget.of(total()) if budget else None)
              if count is not None]
    if not counts and group == policy.groups.canary:
        counts = [policy.max_concurrent]  # the canary's slots record its releases
    return (min(counts) if counts else None), budget


def _slot_groups(view: NodeView, roll: _Roll, policy: Policy) -> list[str]:
    """The groups whose slot this node needs besides a global one (rule 15)."""
    needed = []
    group = roll.group_of(view, policy)
    if _group_limits(policy, group, lambda: 0)[0] is not None or (
            policy.groups.limits(group)[1] is not None):
        needed.append(group)
    if is_control_plane(view.labels):
        needed.append(CONTROL_PLANE_SLOTS)
    return needed


def _missing_group_slots(view: NodeView, slots: list[SlotLease], out: _Builder) -> list[str]:
    held = {lease.group for lease in slots if lease.group}
    return [group for group in _slot_groups(view, out.roll, out.policy) if group not in held]


def _unavailable_reason(view: NodeView) -> str:
    """Why a node is unavailable for a reason of its own ("" when it is not)."""
    if view.deleting:
        return "being deleted"
    if not view.ready:
        return "NotReady"
    if view.unschedulable:
        return "cordoned"
    return ""


def _describe(names: Iterable[str], reasons: Mapping[str, str]) -> str:
    listed = sorted(names)
    shown = [f"{name} {reasons.get(name) or 'in flight'}" for name in listed[:5]]
    more = f", {len(listed) - 5} more" if len(listed) > 5 else ""
    return ", ".join(shown) + more


def _grant(queue: list[NodeView], slots: Mapping[int, SlotLease], in_flight: int,
           out: _Builder) -> None:
    """Rules 1, 15: give free slots to the head of the queue, each only if every limit
    the node is under has room: the global slots (bounded by ``max_unavailable`` too),
    the slots of its group and the control-plane slot, the budgets, the canary."""
    policy, now, roll = out.policy, out.now, out.roll
    views = roll.views
    reasons = roll.reasons
    unavailable = set(reasons) | roll.in_flight
    totals: dict[str, int] = {}

    def group_total(group: str) -> int:
        if not totals:
            for view in views.values():
                found = roll.group_of(view, policy)
                totals[found] = totals.get(found, 0) + 1
        return totals.get(group, 0)

    cap = policy.max_concurrent
    if policy.max_unavailable is not None:
        cap = min(cap, policy.max_unavailable.of(len(views)))
    handed = _handed(cap, out)  # first: a finished holder's unit goes only to its slot
    room = cap - in_flight + len(handed)
    rested = handed + _rested(slots, cap, out)
    taken: dict[str, set[int]] = {}  # group slots this plan takes
    busy: dict[str, set[str]] = {}  # group -> its nodes in flight or holding its slots

    def group_busy(group: str) -> set[str]:
        if group not in busy:
            members = {name for name in roll.in_flight if name in views
                       and ((group == CONTROL_PLANE_SLOTS
                             and is_control_plane(views[name].labels))
                            or roll.group_of(views[name], policy) == group)}
            members |= {lease.holder for lease in roll.group_slots.get(group, {}).values()
                        if lease.holder}
            busy[group] = members
        return busy[group]

    canary_hold = _canary_hold(roll, out)
    went: set[str] = set()  # the nodes that take a global slot in this plan
    for view in queue:
        name = view.name
        new = name not in roll.global_held
        group = roll.group_of(view, policy)
        if new and (room <= 0 or not rested):
            break
        held = {lease.group for lease in roll.group_held.get(name, [])}
        needed = [g for g in _slot_groups(view, roll, policy) if g not in held]
        # A hand-over: the slot's holder is out of the count once it is taken (its reset
        # comes first), unless it is unavailable for a reason of its own; and out of its
        # group's count too where its slot of the group is handed over with it.
        at = _pick_handed(rested, needed, out) if new else 0
        handing = out.handing.get(rested[at].index) if new else None
        giver = handing.holder if handing else ""
        leaving = {giver} - set(reasons) if giver else set()
        if new and policy.max_unavailable is not None:
            allowed = policy.max_unavailable.of(len(views))
            after = len((unavailable - leaving) | {name})
            if after > allowed:
                out.hold(f"max-unavailable: {len(unavailable)} of {len(views)} nodes "
                         f"unavailable ({_describe(unavailable, reasons)}), max-unavailable "
                         f"{policy.max_unavailable}")
                break
        if canary_hold and group != policy.groups.canary:
            _hold_once(out, canary_hold)
            continue
        if new and CONTROL_PLANE_SLOTS in held and (why := _control_plane_hold(
                view, roll, unavailable - leaving, reasons)):
            # Its control-plane slot taken in a plan cut short: the global slot waits
            # as a fresh take would.
            _hold_once(out, why)
            continue
        picks: list[SlotLease] = []
        for needed_group in needed:
            offered = handing.groups.get(needed_group) if handing else None
            why, lease = _group_room(view, needed_group, out, total=group_total,
                                     busy=group_busy(needed_group), unavailable=unavailable,
                                     reasons=reasons,
                                     taken=taken.setdefault(needed_group, set()),
                                     offered=offered[0] if offered else None,
                                     leaving=leaving)
            if why:
                _hold_once(out, why)
                break
            assert lease is not None
            picks.append(lease)
        else:
            # No before-reboot hooks: the grant follows the acquisitions in this plan,
            # without the before-reboot label (no hook waits for it); its rule 3 checks
            # are the acquisitions' own compare-and-swaps.
            fold = new and not policy.before_reboot_annotations
            handed_groups = []
            for lease in picks:
                taken[lease.group].add(lease.index)
                busy[lease.group].add(name)
                # ``_group_room`` returns the giver's slot (it names the giver) only
                # as its hand-over, which counts the giver out of the group.
                from_ = giver if lease.holder else ""
                if from_:
                    handed_groups.append(lease.group)
                out.add(AcquireSlot(lease.index, name, lease.resource_version, view.boot_id,
                                    now, view.uid, group=lease.group,
                                    transitions=lease.transitions + 1, handed_from=from_,
                                    grant_follows=fold))
            if not new:
                continue
            lease = rested.pop(at)
            room -= 1
            went.add(name)
            unavailable.add(name)
            unavailable -= leaving
            out.add(AcquireSlot(lease.index, name, lease.resource_version, view.boot_id, now,
                                view.uid, announced_version=view.state.new_version,
                                transitions=lease.transitions + 1, grant_follows=fold,
                                handed_from=giver))
            if giver:
                out.hand_over(lease.index, handed_groups)
            if fold:  # the Events follow the grant, off its path
                _grant_holder(view, lease.index, "", [
                    *roll.group_held.get(name, []),
                    *(SlotLease(pick.index, resource_version="", group=pick.group)
                      for pick in picks)], out, after_acquire=True, taken=True)
                continue
            out.add(LabelBeforeReboot(name, view.resource_version,
                                      policy.before_reboot_annotations))
            out.event(
                name, EventType.NORMAL, Reason.SLOT_ACQUIRED,
                f"Reboot slot {lease.index} taken; running before-reboot hooks.",
            )
    _give_back_held_back(queue, went, out)


def _give_back_held_back(queue: list[NodeView], went: set[str], out: _Builder) -> None:
    """Rule 15: a queued node that holds group slots but no global one (a plan cut short
    between the two) and takes no global slot in this plan gives its group slots back,
    reset first (``_release_group_slots``). Kept while it waits, they could be the very
    slots the node it waits behind needs: a control-plane node of the canary group waits
    for the control-plane slot of one that waits for the canary. Taking nothing while it
    waits, it takes them again with its global slot, in one plan, when its turn comes."""
    roll = out.roll
    held_back = [view for view in queue if view.name in roll.group_held
                 and view.name not in roll.global_held and view.name not in went]
    if not held_back:
        return
    written = {change.node for change in out.changes if isinstance(
        change, LabelBeforeReboot | GrantRebootOk | LabelAfterReboot | ResetRebootOk)}
    for view in held_back:
        if view.name not in written:  # rule 2: one write per node; the next plan, then
            _release_group_slots(view, roll.group_held[view.name], out)


def _handed(cap: int, out: _Builder) -> list[SlotLease]:
    """The global slots this plan frees at the end of their holders' cycles, each as the
    Lease the hand-over writes: one compare-and-swap from the holder to the next node, in
    place of the release and a take in the next plan (which would see the holder reset
    and out of the count, and the slot free and rested: so only without
    ``delay_between_reboots``). The walk gives these first, so a take that counts on a
    finished holder being out is always its hand-over, written after its reset."""
    if out.policy.delay_between_reboots:
        return []
    return [SlotLease(index, resource_version=handing.lease.resource_version,
                      transitions=handing.lease.transitions)
            for index, handing in sorted(out.handing.items()) if index < cap]


def _pick_handed(rested: list[SlotLease], needed: list[str], out: _Builder) -> int:
    """Which of the slots on offer (``rested``: the handed ones first) a queued node
    that needs slots of ``needed`` groups takes: the first one handed over by a holder
    of a slot of one of those groups (its group slot goes along), else the first."""
    for at, lease in enumerate(rested):
        handing = out.handing.get(lease.index)
        if handing is None:
            break
        if any(group in handing.groups for group in needed):
            return at
    return 0


def _rested(slots: Mapping[int, SlotLease], cap: int, out: _Builder) -> list[SlotLease]:
    """The free global slots below ``cap`` that have rested ``delay_between_reboots``."""
    rested: list[SlotLease] = []
    delay = out.policy.delay_between_reboots
    for index in range(cap):
        lease = slots[index]
        if lease.holder:
            continue
        if lease.released_at is not None and out.now < lease.released_at + delay:
            out.wake_at(lease.released_at + delay)
        else:
            rested.append(lease)
    return rested


def _hold_once(out: _Builder, reason: str) -> None:
    if reason not in out.holds:
        out.hold(reason)


def _group_room(
    view: NodeView, group: str, out: _Builder, *, total: Callable[[str], int],
    busy: set[str], unavailable: set[str], reasons: Mapping[str, str], taken: set[int],
    offered: SlotLease | None = None, leaving: set[str] | frozenset[str] = frozenset(),
) -> tuple[str, SlotLease | None]:
    """A free slot of ``group`` for ``view``, or why there is none (rule 15). ``offered``:
    the slot of ``group`` a finished holder hands over with its global slot; taken
    first, and only then are ``leaving`` (that holder) out of the group's counts."""
    policy, roll = out.policy, out.roll
    count, budget = _group_limits(policy, group, lambda: total(group))
    label = "control-plane" if group == CONTROL_PLANE_SLOTS else f"group {group}"
    if offered is not None and offered.index < (count or 0) and offered.index not in taken:
        busy, unavailable = busy - leaving, unavailable - leaving
    else:
        offered = None
    if group == CONTROL_PLANE_SLOTS and (why := _control_plane_hold(
            view, roll, unavailable, reasons)):
        return why, None
    if budget is not None:
        members = {name for name in unavailable if name in roll.views
                   and roll.group_of(roll.views[name], policy) == group}
        allowed = budget.of(total(group))
        if len(members | {view.name}) > allowed:
            return (f"max-unavailable: {len(members)} of {total(group)} nodes of {label} "
                    f"unavailable ({_describe(members, reasons)}), its max-unavailable "
                    f"{budget}"), None
    limit = count or 0
    others = busy - {view.name}
    if len(others) >= limit:
        return (f"max-concurrent: {label} has {len(others)} node(s) in flight, its "
                f"max-concurrent {limit}"), None
    if offered is not None:
        return "", offered
    slots = roll.group_slots.get(group, {})
    for index in range(limit):
        lease = slots.get(index) or SlotLease(index, group=group)
        if lease.holder or index in taken:
            continue
        rest_until = (lease.released_at + policy.delay_between_reboots
                      if lease.released_at is not None else None)
        if rest_until is not None and out.now < rest_until:
            out.wake_at(rest_until)
            continue
        return "", lease
    return f"max-concurrent: {label} has no free slot of its {limit}", None


def _control_plane_hold(view: NodeView, roll: _Roll, unavailable: set[str],
                        reasons: Mapping[str, str]) -> str:
    """Rule 15: why a control-plane node takes no slot now ("" when it may)."""
    others = {name for name in unavailable
              if name != view.name and name in roll.views
              and is_control_plane(roll.views[name].labels)}
    if not others:
        return ""
    return (f"control-plane: one control-plane node at a time, and none while "
            f"another is unavailable ({_describe(others, reasons)})")


def _canary_hold(roll: _Roll, out: _Builder) -> str:
    """Rule 15's canary: why the other groups wait ("" when they do not)."""
    policy = out.policy
    canary = policy.groups.canary
    if not canary:
        return ""
    busy = sorted(  # a node that needs a reboot is in a cycle (NodeIndex.active)
        name for name in roll.in_flight | roll.active
        if (view := roll.views.get(name)) is not None
        and (name in roll.in_flight
             or (view.state.reboot_needed and not view.state.reboot_paused))
        and roll.group_of(view, policy) == canary
    )
    if busy:
        return (f"canary: group {canary} goes first, then soaks {policy.canary_soak}; "
                f"its nodes not done yet: {', '.join(busy[:5])}")
    slots = roll.group_slots.get(canary, {}).values()
    if any(lease.holder for lease in slots):
        return f"canary: group {canary} goes first; it still holds a slot"
    released = [lease.released_at for lease in slots if lease.released_at is not None]
    if released and out.now < max(released) + policy.canary_soak:
        end = max(released) + policy.canary_soak
        out.wake_at(end)
        return (f"canary: group {canary} soaks {policy.canary_soak} after its last "
                f"release, until {seconds_time(end)}")
    return ""
