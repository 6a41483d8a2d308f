"""Rules from a sensor reading to a switch (cluster.yaml ``rules:``): their schema, their checks and the
decision of one rule at one moment (core: data to data, no I/O, no clock).

    rules:
      - name: cupboard-fan
        sensor: temp01            # the node whose readings count (a sensor node, or any Pi)
        metric: temperature_c     # one of pibake.sensors_model.METRICS
        switch: fan               # a switch of switches: that powers a thing, never a node
        on_above: 30              # cooling: on above 30, off below 27 (hysteresis between them)
        off_below: 27
        min_on_s: 300             # once on, stay on at least this long (default 60)
        min_off_s: 300            # once off, stay off at least this long (default 60)
        max_age_s: 600            # a reading older than this is not acted on (default 600)

A heating rule turns the switch on *below* a value and off *above* another (``on_below`` + ``off_above``).
Between the two values the switch is left as it is. ``decide`` is pure: the newest reading, the switch's
state, when it last changed and the time in; what to do and why out. ``pibake.switches.rules`` does the I/O.
"""

from dataclasses import dataclass

from pibake.sensors_model import METRICS

DEFAULT_MIN_ON_S = 60.0  # a fan or heater switched every few seconds wears its relay and the plug's
DEFAULT_MIN_OFF_S = 60.0
DEFAULT_MAX_AGE_S = 600.0  # a sensor sends every minute or so; ten minutes of silence: do not act on old data

_SECONDS = {"type": "number", "minimum": 0, "maximum": 86400}
RULES_SCHEMA = {
    "type": ["array", "null"],
    "maxItems": 64,
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "sensor", "metric", "switch"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 63},
            "sensor": {"type": "string", "minLength": 1, "maxLength": 63},
            "metric": {"enum": sorted(METRICS)},
            "switch": {"type": "string", "minLength": 1, "maxLength": 63},
            "on_above": {"type": "number"},
            "off_below": {"type": "number"},
            "on_below": {"type": "number"},
            "off_above": {"type": "number"},
            "min_on_s": _SECONDS,
            "min_off_s": _SECONDS,
            "max_age_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
        },
    },
}


@dataclass(frozen=True)
class Rule:
    name: str
    sensor: str
    metric: str
    switch: str
    on_above: float | None = None
    off_below: float | None = None
    on_below: float | None = None
    off_above: float | None = None
    min_on_s: float = DEFAULT_MIN_ON_S
    min_off_s: float = DEFAULT_MIN_OFF_S
    max_age_s: float = DEFAULT_MAX_AGE_S

    @property
    def cooling(self):
        return self.on_above is not None

    def describe(self):
        unit = METRICS[self.metric].unit
        if self.cooling:
            when = f"on above {self.on_above:g}{unit}, off below {self.off_below:g}{unit}"
        else:
            when = f"on below {self.on_below:g}{unit}, off above {self.off_above:g}{unit}"
        return f"{self.switch} {when} ({self.sensor} {self.metric})"


def rules_problems(rules, switches, valid_name=None, skip=()):
    """The checks on ``rules:`` a schema cannot express, as 'rules[i].key: ...' strings. ``switches``: the
    validated ``switches:`` entries (dicts); ``valid_name(text)``: True for a valid hostname/switch name;
    ``skip``: indexes the schema already rejected (not looked at again)."""
    by_name = {s.get("name"): s for s in switches or () if isinstance(s, dict)}
    out = []
    seen = {}
    switched = {}  # switch name -> the rule that switches it: two rules would fight over one plug
    for i, rule in enumerate(rules):
        if i in skip:
            continue
        where = f"rules[{i}]"
        name = rule["name"]
        if valid_name is not None and not valid_name(name):
            out.append(f"{where}.name: {name!r} is not a valid rule name (lower case letters, digits and '-')")
        elif name in seen:
            out.append(f"{where}.name: {name!r} is already the name of rules[{seen[name]}]")
        else:
            seen[name] = i
        if valid_name is not None and not valid_name(rule["sensor"]):
            out.append(f"{where}.sensor: {rule['sensor']!r} is not a valid hostname")
        switch = by_name.get(rule["switch"])
        if switch is None:
            known = ", ".join(sorted(n for n in by_name if n)) or "none declared"
            out.append(f"{where}.switch: no switch named {rule['switch']!r} in switches: ({known})")
        elif switch.get("node"):
            out.append(f"{where}.switch: {rule['switch']} powers node {switch['node']}; a rule may only switch a "
                       "thing (a fan, a heater), never a node")
        elif rule["switch"] in switched:
            out.append(f"{where}.switch: {rule['switch']} is already switched by rules[{switched[rule['switch']]}]; "
                       "one rule per switch")
        else:
            switched[rule["switch"]] = i
        out.extend(_threshold_problems(where, rule))
    return out


def _threshold_problems(where, rule):
    cooling = [k for k in ("on_above", "off_below") if k in rule]
    heating = [k for k in ("on_below", "off_above") if k in rule]
    if cooling and heating:
        return [f"{where}: give on_above + off_below (cooling) or on_below + off_above (heating), not both"]
    if len(cooling) == 2:
        if not rule["off_below"] < rule["on_above"]:
            return [f"{where}.off_below: {rule['off_below']:g} must be below on_above ({rule['on_above']:g}); the "
                    "gap between them is the hysteresis"]
        return _in_range(where, rule, cooling)
    if len(heating) == 2:
        if not rule["on_below"] < rule["off_above"]:
            return [f"{where}.on_below: {rule['on_below']:g} must be below off_above ({rule['off_above']:g}); the "
                    "gap between them is the hysteresis"]
        return _in_range(where, rule, heating)
    given = cooling or heating
    if given:
        missing = {"on_above": "off_below", "off_below": "on_above", "on_below": "off_above",
                   "off_above": "on_below"}[given[0]]
        return [f"{where}.{missing}: missing ({given[0]} needs it: switching on and off at two values)"]
    return [f"{where}: say when to switch: on_above + off_below (cooling) or on_below + off_above (heating)"]


def _in_range(where, rule, keys):
    metric = METRICS[rule["metric"]]
    return [f"{where}.{k}: {rule[k]:g} is outside {rule['metric']}'s range {metric.low:g}..{metric.high:g}"
            for k in keys if not metric.low <= rule[k] <= metric.high]


def rules_from_data(data):
    """``Rule`` for each entry of a *validated* ``rules:`` list."""
    return tuple(Rule(**{k: float(v) if k not in ("name", "sensor", "metric", "switch") else v
                         for k, v in entry.items()}) for entry in data or ())


@dataclass(frozen=True)
class Decision:
    action: str | None  # "on", "off", or None (leave the switch as it is)
    why: str
    value: float | None = None


def decide(rule, reading, switch_on, last_change, now):
    """What ``rule`` wants now.

    ``reading``: the sensor's newest reading ({"time": epoch s, "metrics": {...}}) or None; ``switch_on``: the
    state read from the plug (True/False); ``last_change``: epoch seconds of the switch's last recorded
    change (by anyone), None when unknown; ``now``: epoch seconds.
    """
    metrics = (reading or {}).get("metrics") or {}
    value = metrics.get(rule.metric)
    if reading is None or value is None:
        return Decision(None, f"no {rule.metric} reading from {rule.sensor}; {rule.switch} left "
                              f"{'on' if switch_on else 'off'}")
    age = now - float(reading["time"])
    if age > rule.max_age_s:
        return Decision(None, f"{rule.sensor}'s newest {rule.metric} is {age:.0f} s old (max_age_s "
                              f"{rule.max_age_s:g}); {rule.switch} left {'on' if switch_on else 'off'}", value)
    unit = METRICS[rule.metric].unit
    shown = f"{rule.metric} {value:g}{unit}"
    if rule.cooling:
        want_on, want_off = value > rule.on_above, value < rule.off_below
        on_text, off_text = f"above {rule.on_above:g}{unit}", f"below {rule.off_below:g}{unit}"
    else:
        want_on, want_off = value < rule.on_below, value > rule.off_above
        on_text, off_text = f"below {rule.on_below:g}{unit}", f"above {rule.off_above:g}{unit}"
    if want_on and not switch_on:
        action, because = "on", f"{shown} is {on_text}"
    elif want_off and switch_on:
        action, because = "off", f"{shown} is {off_text}"
    else:
        state = "on" if switch_on else "off"
        return Decision(None, f"{shown}: {rule.switch} stays {state}", value)
    held = rule.min_off_s if action == "on" else rule.min_on_s
    if last_change is not None and now - last_change < held:
        key = "min_off_s" if action == "on" else "min_on_s"
        return Decision(None, f"{because}, but {rule.switch} changed {now - last_change:.0f} s ago ({key} "
                              f"{held:g}); it stays {'off' if action == 'on' else 'on'} for now", value)
    return Decision(action, because, value)
