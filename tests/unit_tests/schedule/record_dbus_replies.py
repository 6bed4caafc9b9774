"""Record the D-Bus reply messages in ``data/*.hex`` (run by hand: ``python -m tests.unit_tests.schedule.record_dbus_replies``).

Each reply travels through a real ``dbus-daemon``: the ``ServiceUnknown`` error is the daemon's own answer
when GNOME is not running; the Mutter and logind answers come from the fake services in
``dbus_service.py``, shaped like the real ones (``t`` milliseconds; ``a{sv}`` session properties).
The bytes are the received message re-serialised by jeepney, as hex.
"""

from __future__ import annotations

from pathlib import Path

from jeepney.io.blocking import open_dbus_connection

from langchain_metaclaw.schedule.idle_os import logind_properties_message, mutter_idletime_message
from tests.unit_tests.schedule.dbus_service import logind_handler, mutter_handler, private_bus, serve

DATA = Path(__file__).parent / "data"

# Values of a real GNOME session idle for ~10 min (IdleSinceHint µs since the epoch, monotonic µs since boot).
LOGIND_IDLE = {
    "Id": ("s", "2"),
    "Name": ("s", "ada"),
    "Type": ("s", "wayland"),
    "Class": ("s", "user"),
    "Active": ("b", True),
    "IdleHint": ("b", True),
    "IdleSinceHint": ("t", 1743300000000000),
    "IdleSinceHintMonotonic": ("t", 86400000000),
    "LockedHint": ("b", False),
}
LOGIND_ACTIVE = {
    **LOGIND_IDLE,
    "IdleHint": ("b", False),
    "IdleSinceHint": ("t", 1743290000000000),
    "IdleSinceHintMonotonic": ("t", 76400000000),
}


def _record(address: str, message, name: str) -> None:
    with open_dbus_connection(bus=address) as conn:
        reply = conn.send_and_get_reply(message, timeout=5)
    (DATA / name).write_text(reply.serialise().hex() + "\n")
    print(name, reply.header.message_type, reply.body)


def main() -> None:
    with private_bus() as address:
        _record(address, mutter_idletime_message(), "dbus_mutter_service_unknown.hex")
        with serve(address, "org.gnome.Mutter.IdleMonitor", mutter_handler(754321)):
            _record(address, mutter_idletime_message(), "dbus_mutter_getidletime.hex")
        session = "/org/freedesktop/login1/session/auto"
        with serve(address, "org.freedesktop.login1", logind_handler(LOGIND_IDLE)):
            _record(address, logind_properties_message(session), "dbus_logind_getall_idle.hex")
        with serve(address, "org.freedesktop.login1", logind_handler(LOGIND_ACTIVE)):
            _record(address, logind_properties_message(session), "dbus_logind_getall_active.hex")


if __name__ == "__main__":
    main()
