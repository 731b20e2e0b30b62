"""Keep liblsl's own log lines off the terminal of ``run``, ``demo`` and ``replay``.

liblsl writes INFO lines (``Loaded default config``, its build string, ...) straight to stderr
from C++, where they scribble over the rich dashboard and the replay progress bar. When the
user has no liblsl configuration of their own, the commands give liblsl one that only sets its
log level to errors (``[log] level = -2``) through liblsl's config-content API. Nothing else is
set, so liblsl's network defaults (resolve scope, ports, IPv6) stay exactly what they would have
been. A user who has a configuration (``LSLAPICFG``, or ``lsl_api.cfg`` in the current folder,
``~/lsl_api/`` or ``/etc/lsl_api/``) keeps it untouched, log level included: content set through
the API would take precedence over their file.

It must run before the first LSL call that loads the configuration (opening an outlet or inlet,
resolving); later it has no effect. It needs liblsl >= 1.17.7 (pylsl's ``set_config_content``);
with an older one the log lines stay (set ``LSLAPICFG`` to a file with ``[log] level = -2``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: The whole configuration given to liblsl: errors only, everything else liblsl's default.
QUIET_CONFIG = "[log]\nlevel = -2\n"


def user_lsl_config(
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
) -> str | None:
    """Where liblsl would find the user's own configuration, or None when it would use its
    defaults. The places are liblsl's, in its order: ``LSLAPICFG``, ``./lsl_api.cfg``,
    ``~/lsl_api/lsl_api.cfg``, ``/etc/lsl_api/lsl_api.cfg``."""
    env = os.environ if env is None else env
    if env.get("LSLAPICFG"):
        return f"LSLAPICFG={env['LSLAPICFG']}"
    cwd = Path.cwd() if cwd is None else cwd
    places = [cwd / "lsl_api.cfg"]
    if home is None:
        try:
            home = Path.home()
        except RuntimeError:  # no home directory: liblsl cannot look there either
            home = None
    if home is not None:
        places.append(home / "lsl_api" / "lsl_api.cfg")
    places.append(Path("/etc/lsl_api/lsl_api.cfg"))
    for path in places:
        if path.is_file():
            return str(path)
    return None


def quiet_liblsl() -> bool:
    """Give liblsl the errors-only configuration unless the user has their own.

    Returns True when it was set; False when the user's configuration is used, or this
    liblsl has no config-content API (then its INFO lines still appear).
    """
    if user_lsl_config() is not None:
        return False
    try:
        import pylsl

        set_content = getattr(pylsl, "set_config_content", None)
        if set_content is None:
            return False
        set_content(QUIET_CONFIG)
    except (NotImplementedError, RuntimeError, OSError):  # old or missing liblsl
        return False
    return True
