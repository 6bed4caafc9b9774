"""The schedule package's surface, and that importing it stays light."""

import subprocess
import sys

import langchain_metaclaw.schedule as schedule


def test_all_names_resolve():
    for name in schedule.__all__:
        assert getattr(schedule, name) is not None


def test_import_does_not_load_optional_packages():
    code = (
        "import sys, langchain_metaclaw.schedule\n"
        "from langchain_metaclaw.schedule import WindowPolicy, Watchdog, CalendarSource, detect_idle_detector\n"
        "heavy = ('apscheduler', 'icalendar', 'recurring_ical_events', 'jeepney', 'psutil', 'torch')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
