"""Device groups: the chips one worker drives, written the same way everywhere ("0" or "0,1").

A bmodel compiled for several devices (sophon-demo's `2dev` models for an SC7 card) runs on a
group of chips at once; a worker then owns the whole group. The group's text form is its ids
sorted, comma-joined, no spaces: config, Hello, metrics labels, logs and admin calls all use it.
"""

from __future__ import annotations

DeviceGroup = tuple[int, ...]


class DeviceGroupError(ValueError):
    """Text or a value that is not a device group."""


def parse_group(text: str) -> DeviceGroup:
    """ "2" -> (2,); "1, 0" -> (0, 1). Ids are integers >= 0, each once."""
    parts = [part.strip() for part in str(text).split(",")]
    if not parts or not all(part.isdigit() for part in parts):
        raise DeviceGroupError(
            f"a device group is a device id or comma-separated ids such as 0,1, got {text!r}"
        )
    ids = [int(part) for part in parts]
    if len(set(ids)) != len(ids):
        raise DeviceGroupError(f"a device group names each device once, got {text!r}")
    return tuple(sorted(ids))


def group_of(value: object) -> DeviceGroup:
    """A config value as a group: an integer id, or a string of ids ("0,1")."""
    if isinstance(value, bool):
        raise DeviceGroupError(f"a device id is an integer, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise DeviceGroupError(f"device ids are >= 0, got {value}")
        return (value,)
    if isinstance(value, str):
        return parse_group(value)
    raise DeviceGroupError(f"a device group is an id or a string such as '0,1', got {value!r}")


def format_group(group: DeviceGroup) -> str:
    return ",".join(str(device) for device in sorted(group))


def overlapping(groups: list[DeviceGroup]) -> list[int]:
    """Devices that appear in more than one group, sorted."""
    seen: set[int] = set()
    repeated: set[int] = set()
    for group in groups:
        repeated |= seen & set(group)
        seen |= set(group)
    return sorted(repeated)
