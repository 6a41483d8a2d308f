"""Rules from a sensor to a switch, the pure part (pibake.rules_model): decide() on a table of readings, states
and clocks, and cluster.yaml's rules: checks as (input, error message) pairs."""

import pytest

from pibake.cluster import validate_cluster_data
from pibake.rules_model import Rule, decide, rules_from_data

NOW = 1_800_000_000.0
FAN = Rule(name="cupboard-fan", sensor="temp01", metric="temperature_c", switch="fan", on_above=30, off_below=27,
           min_on_s=300, min_off_s=300, max_age_s=600)
HEATER = Rule(name="shed-heater", sensor="temp02", metric="temperature_c", switch="heater", on_below=18,
              off_above=21, min_on_s=0, min_off_s=0)


def reading(value, age=10.0, metric="temperature_c"):
    return {"time": NOW - age, "metrics": {metric: value}}


@pytest.mark.parametrize("rule, newest, on, changed_ago, action, why", [
    # cooling: on above 30, off below 27, nothing in between
    (FAN, reading(31.2), False, None, "on", "temperature_c 31.2°C is above 30°C"),
    (FAN, reading(31.2), True, None, None, "temperature_c 31.2°C: fan stays on"),
    (FAN, reading(28.5), False, None, None, "temperature_c 28.5°C: fan stays off"),
    (FAN, reading(28.5), True, None, None, "temperature_c 28.5°C: fan stays on"),
    (FAN, reading(30), False, None, None, "temperature_c 30°C: fan stays off"),  # at the value: not above it
    (FAN, reading(27), True, None, None, "temperature_c 27°C: fan stays on"),
    (FAN, reading(26.4), True, None, "off", "temperature_c 26.4°C is below 27°C"),
    (FAN, reading(26.4), False, None, None, "temperature_c 26.4°C: fan stays off"),
    # minimum on/off time, counted from the switch's last change (by anyone)
    (FAN, reading(26.4), True, 100, None, "temperature_c 26.4°C is below 27°C, but fan changed 100 s ago "
                                          "(min_on_s 300); it stays on for now"),
    (FAN, reading(26.4), True, 300, "off", "temperature_c 26.4°C is below 27°C"),
    (FAN, reading(31.2), False, 299, None, "temperature_c 31.2°C is above 30°C, but fan changed 299 s ago "
                                           "(min_off_s 300); it stays off for now"),
    (FAN, reading(31.2), False, 3600, "on", "temperature_c 31.2°C is above 30°C"),
    # no fresh reading: nothing is switched
    (FAN, reading(31.2, age=601), False, None, None, "temp01's newest temperature_c is 601 s old (max_age_s 600); "
                                                      "fan left off"),
    (FAN, reading(31.2, age=600), False, None, "on", "temperature_c 31.2°C is above 30°C"),
    (FAN, None, True, None, None, "no temperature_c reading from temp01; fan left on"),
    (FAN, reading(55, metric="humidity_pct"), False, None, None, "no temperature_c reading from temp01; fan left off"),
    # heating: on below 18, off above 21
    (HEATER, reading(17.5), False, None, "on", "temperature_c 17.5°C is below 18°C"),
    (HEATER, reading(19.5), True, None, None, "temperature_c 19.5°C: heater stays on"),
    (HEATER, reading(21.5), True, None, "off", "temperature_c 21.5°C is above 21°C"),
    (HEATER, reading(21.5), False, 0, None, "temperature_c 21.5°C: heater stays off"),
])
def test_decide(rule, newest, on, changed_ago, action, why):
    decision = decide(rule, newest, on, None if changed_ago is None else NOW - changed_ago, NOW)
    assert (decision.action, decision.why) == (action, why)


BASE = {"name": "red", "manager": "red00", "manager_ip": "10.1.1.10", "network": "10.1.1.0/24",
        "switches": [{"name": "fan", "driver": "kasa", "address": "10.1.1.50", "thing": "cupboard fan"},
                     {"name": "heater", "driver": "kasa", "address": "10.1.1.51", "thing": "heater"},
                     {"name": "rack-red01", "driver": "kasa", "address": "10.1.1.52", "node": "red01"}]}
RULE = {"name": "cupboard-fan", "sensor": "temp01", "metric": "temperature_c", "switch": "fan", "on_above": 30,
        "off_below": 27}


@pytest.mark.parametrize("change, error", [
    ({"off_below": 31}, "rules[0].off_below: 31 must be below on_above (30); the gap between them is the hysteresis"),
    ({"off_below": None}, "rules[0].off_below: missing (on_above needs it: switching on and off at two values)"),
    ({"on_above": None, "off_below": None},
     "rules[0]: say when to switch: on_above + off_below (cooling) or on_below + off_above (heating)"),
    ({"on_below": 10}, "rules[0]: give on_above + off_below (cooling) or on_below + off_above (heating), not both"),
    ({"on_above": None, "off_below": None, "on_below": 22, "off_above": 21},
     "rules[0].on_below: 22 must be below off_above (21); the gap between them is the hysteresis"),
    ({"on_above": 90}, "rules[0].on_above: 90 is outside temperature_c's range -40..85"),
    ({"switch": "pump"}, "rules[0].switch: no switch named 'pump' in switches: (fan, heater, rack-red01)"),
    ({"switch": "rack-red01"},
     "rules[0].switch: rack-red01 powers node red01; a rule may only switch a thing (a fan, a heater), never a node"),
    ({"metric": "temp"}, "rules[0].metric: 'temp' is not one of gas_ohm, humidity_pct, pressure_hpa, "
                         "soc_temperature_c, temperature_c, throttled, wifi_bitrate_mbps, wifi_quality_pct, "
                         "wifi_signal_dbm"),
    ({"sensor": "Temp 01"}, "rules[0].sensor: 'Temp 01' is not a valid hostname"),
    ({"name": "Fan!"}, "rules[0].name: 'Fan!' is not a valid rule name (lower case letters, digits and '-')"),
    ({"min_on_s": -1}, "rules[0].min_on_s: -1 is less than the minimum of 0"),
    ({"colour": "red"}, "rules[0]: unknown key 'colour' (known keys: name, sensor, metric, switch, on_above, "
                        "off_below, on_below, off_above, min_on_s, min_off_s, max_age_s)"),
])
def test_rules_problems_name_the_rule_and_the_key(change, error):
    rule = {k: v for k, v in {**RULE, **change}.items() if v is not None}
    assert error in validate_cluster_data({**BASE, "rules": [rule]})


def test_two_rules_for_one_switch_and_two_names_alike_are_refused_every_problem_at_once():
    second = {**RULE, "sensor": "temp02"}
    broken = {**RULE, "name": "other", "metric": "temp"}  # the schema rejects it; the others are still checked
    problems = validate_cluster_data({**BASE, "rules": [RULE, second, broken]})
    assert "rules[1].name: 'cupboard-fan' is already the name of rules[0]" in problems
    assert "rules[1].switch: fan is already switched by rules[0]; one rule per switch" in problems
    assert any(p.startswith("rules[2].metric: 'temp' is not one of") for p in problems)


def test_a_valid_rule_loads_with_its_defaults():
    assert validate_cluster_data({**BASE, "rules": [RULE]}) == []
    [rule] = rules_from_data([RULE])
    assert rule == Rule("cupboard-fan", "temp01", "temperature_c", "fan", on_above=30.0, off_below=27.0,
                        min_on_s=60.0, min_off_s=60.0, max_age_s=600.0)
    assert rule.describe() == "fan on above 30°C, off below 27°C (temp01 temperature_c)"
