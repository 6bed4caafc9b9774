"""A private ``dbus-daemon`` and tiny jeepney services that play Mutter and logind, for tests.

The detectors then talk over a real socket through a real bus daemon, so the transport, the bus's own
error replies (``ServiceUnknown``) and jeepney's (de)serialisation are all exercised. Also used by
``data/record_dbus_replies.py`` to record the reply bytes kept in ``data/``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def dbus_daemon_available() -> bool:
    return shutil.which("dbus-daemon") is not None


@contextlib.contextmanager
def private_bus() -> Iterator[str]:
    """Start a throwaway ``dbus-daemon``; yield its address (``unix:path=...``)."""
    with tempfile.TemporaryDirectory(prefix="metaclaw-dbus-") as tmp:
        socket = Path(tmp) / "bus"
        config = Path(tmp) / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=socket))
        proc = subprocess.Popen(
            ["dbus-daemon", "--config-file", str(config), "--nofork", "--nopidfile", "--print-address"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            address = proc.stdout.readline().strip()
            if not address:
                raise RuntimeError(f"dbus-daemon did not start: {proc.stderr.read()}")
            yield address
        finally:
            proc.terminate()
            proc.wait(timeout=5)


Handler = Callable[[Any], tuple[str, tuple] | tuple[str, str, tuple]]


@contextlib.contextmanager
def serve(address: str, bus_name: str, handler: Handler) -> Iterator[None]:
    """Own ``bus_name`` on ``address`` and answer each method call with ``handler(msg)``.

    The handler returns ``(signature, body)`` for a method return, or ``("error", name, body)``.
    """
    from jeepney import MessageType, new_error, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    conn = open_dbus_connection(bus=address)
    reply = conn.send_and_get_reply(message_bus.RequestName(bus_name), timeout=5)
    assert reply.body == (1,), reply.body  # DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                msg = conn.receive(timeout=0.05)
            except TimeoutError:
                continue
            except OSError:
                return
            if msg.header.message_type != MessageType.method_call:
                continue
            answer = handler(msg)
            if answer[0] == "error":
                conn.send(new_error(msg, answer[1], "s", answer[2]))
            else:
                conn.send(new_method_return(msg, answer[0], answer[1]))

    thread = threading.Thread(target=loop, name=f"fake-{bus_name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        conn.close()


def mutter_handler(idle_ms: int) -> Handler:
    from jeepney import HeaderFields

    def handle(msg: Any) -> tuple:
        fields = msg.header.fields
        if (fields.get(HeaderFields.path), fields.get(HeaderFields.member)) == (
            "/org/gnome/Mutter/IdleMonitor/Core",
            "GetIdletime",
        ):
            return ("t", (idle_ms,))
        return ("error", "org.freedesktop.DBus.Error.UnknownMethod", ("no such method",))

    return handle


def logind_handler(props: dict[str, tuple[str, Any]], sessions: dict[str, str] | None = None) -> Handler:
    """Answer ``GetAll("org.freedesktop.login1.Session")`` on any session path, and ``GetSession(id)``."""
    from jeepney import HeaderFields

    sessions = sessions or {}

    def handle(msg: Any) -> tuple:
        fields = msg.header.fields
        member = fields.get(HeaderFields.member)
        path = fields.get(HeaderFields.path)
        if member == "GetAll" and path.startswith("/org/freedesktop/login1/session/"):
            if msg.body != ("org.freedesktop.login1.Session",):
                return ("error", "org.freedesktop.DBus.Error.UnknownInterface", (repr(msg.body),))
            return ("a{sv}", (props,))
        if member == "GetSession":
            sid = msg.body[0]
            if sid in sessions:
                return ("o", (sessions[sid],))
            return ("error", "org.freedesktop.login1.NoSuchSession", (f"No session '{sid}' known",))
        return ("error", "org.freedesktop.DBus.Error.UnknownMethod", (f"{member} on {path}",))

    return handle
