"""The sensor agent's I2C side: the REAL driver libraries (Debian's python3-bme280 = RPi.bme280 in the agent,
Pimoroni's bmp280 as an independent second driver) over a register-level simulated bus (the only fake: there is
no I2C hardware here), fed with the BMP280 datasheet's worked example and random trimming/raw values."""

import errno
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.firstboot.sensorkit import DATASHEET, FIXTURES, load_agent, register_image

sa = load_agent()
bme280 = pytest.importorskip("bme280", reason="test extra RPi.bme280 not installed (pip install -e .[test])")
bmp280 = pytest.importorskip("bmp280", reason="test extra bmp280 (Pimoroni) not installed (pip install -e .[test])")


def bus_of(image):
    return sa.RegisterImageBus(image["devices"])


def datasheet_image(chip_id=0x58, **kw):
    return register_image(chip_id, DATASHEET["T"], DATASHEET["P"], DATASHEET["adc_T"], DATASHEET["adc_P"], **kw)


def test_datasheet_worked_example_reads_25_08_c_and_1006_53_hpa():
    bus = bus_of(datasheet_image())
    address, chip = sa.detect_chip(bus)
    assert (address, chip) == (0x76, "bmp280")
    metrics = sa.finish_metrics(sa.read_bosch(bus, address, chip), {})
    assert metrics == {"temperature_c": 25.08, "pressure_hpa": 1006.53}  # BMP280: no humidity key at all


def test_the_fixture_file_is_the_same_example_and_the_cli_reads_it(tmp_path, capsys):
    settings_file = tmp_path / "sensor.json"
    settings_file.write_text(json.dumps({"sim_bus": str(FIXTURES / "bmp280-datasheet.json"), "wifi_interface": None,
                                         "thermal_dir": str(tmp_path / "none"), "agent_config": str(tmp_path / "no"),
                                         "offsets": {"temperature_c": -0.5}}))
    assert sa.main(["--config", str(settings_file), "--dry-run", "--json"]) == 0
    reading = json.loads(capsys.readouterr().out)
    assert reading["metrics"] == {"temperature_c": 24.58, "pressure_hpa": 1006.53}
    assert reading["place"] is None and reading["wifi"] is None


def test_bme280_has_humidity_and_is_found_at_0x77():
    bus = sa.RegisterImageBus.load(FIXTURES / "bme280-lab.json")
    address, chip = sa.detect_chip(bus)
    assert (address, chip) == (0x77, "bme280")
    metrics = sa.finish_metrics(sa.read_bosch(bus, address, chip), {})
    assert metrics["temperature_c"] == 25.08 and metrics["pressure_hpa"] == 1006.53
    assert 0 < metrics["humidity_pct"] < 100


def test_configured_address_is_the_only_one_tried():
    bus = bus_of(datasheet_image(address=0x77))
    assert sa.detect_chip(bus, 0x77) == (0x77, "bmp280")
    with pytest.raises(sa.SensorError, match="nothing at 0x76$"):
        sa.detect_chip(bus, 0x76)


def test_no_device_nacks_like_smbus2_and_is_reported():
    bus = sa.RegisterImageBus({})
    with pytest.raises(OSError) as exc:
        bus.read_byte_data(0x76, 0xD0)
    assert exc.value.errno == errno.EREMOTEIO
    with pytest.raises(sa.SensorError, match="nothing at 0x76; nothing at 0x77"):
        sa.detect_chip(bus)


def test_wrong_chip_id_is_named():
    bus = bus_of(datasheet_image(chip_id=0x55))
    with pytest.raises(sa.SensorError, match="0x76 has chip id 0x55"):
        sa.detect_chip(bus)


def test_measuring_bit_stuck_discards_the_reading():
    bus = bus_of(datasheet_image(stuck=True))
    with pytest.raises(sa.SensorError, match="stays busy"):
        sa.read_bosch(bus, 0x76, "bmp280")


def test_reading_goes_on_without_the_sensor(tmp_path):
    """A node whose sensor is missing still reports the rest (here: its SoC temperature)."""
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("47234\n")
    settings = {**sa.DEFAULTS, "sim_bus": None, "wifi_interface": None, "thermal_dir": str(tmp_path / "thermal")}
    reader = sa.Reader(settings, run=lambda argv: None, bus=sa.RegisterImageBus({}))
    reading = reader.take()
    assert reading["metrics"] == {"soc_temperature_c": 47.23}
    assert "nothing at 0x76" in reader.last_problem


def _second_driver(image, address):
    """Pimoroni's bmp280 (i2cdevice, its own float compensation) over the same simulated registers."""
    sensor = bmp280.BMP280(i2c_addr=address, i2c_dev=bus_of(image))
    sensor.setup(mode="forced")
    sensor.update_sensor()
    return sensor.temperature, sensor.pressure


@settings(max_examples=150, deadline=None)
@given(t1=st.integers(25000, 30000), t2=st.integers(25000, 28000), t3=st.integers(-1500, 0),
       p1=st.integers(34000, 39000), p2=st.integers(-11500, -10000), p3=st.integers(2500, 3500),
       p4=st.integers(2000, 8000), p5=st.integers(-200, 300), p6=st.integers(-10, 0),
       p7=st.integers(15000, 16000), p8=st.integers(-15000, -14000), p9=st.integers(5000, 6500),
       adc_t=st.integers(400000, 600000), adc_p=st.integers(250000, 500000),
       address=st.sampled_from([0x76, 0x77]))
def test_agent_matches_an_independent_driver(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, adc_t, adc_p,
                                             address):
    image = register_image(0x58, (t1, t2, t3), (p1, p2, p3, p4, p5, p6, p7, p8, p9), adc_t, adc_p,
                           address=address)
    ours = sa.read_bosch(bus_of(image), *sa.detect_chip(bus_of(image)))
    temperature, pressure = _second_driver(image, address)
    assert abs(ours["temperature_c"] - temperature) <= 0.05
    assert abs(ours["pressure_hpa"] - pressure) <= 0.1


def test_offsets_and_plausible_ranges():
    metrics = sa.finish_metrics({"temperature_c": 21.234, "humidity_pct": 140.0, "pressure_hpa": 1000.0,
                                 "throttled": 0x50000}, {"temperature_c": -0.5, "pressure_hpa": 1.25})
    assert metrics == {"temperature_c": 20.73, "pressure_hpa": 1001.25, "throttled": 0x50000}


def test_bme680_is_read_through_pimoroni_bme680():
    """Chip id 0x61 goes to Pimoroni's bme680 library (over the same simulated bus): temperature, pressure and
    humidity from it; gas resistance only when the chip says its heater is stable (status bit 4 of 0x2B)."""
    pytest.importorskip("bme680", reason="test extra bme680 (Pimoroni) not installed (pip install -e .[test])")
    trimming = " ".join(f"{(7 * i + 3) % 200 + 1:02x}" for i in range(25))
    for gas_lsb, stable in (("80", False), ("b0", True)):  # 0x2B: gas_valid bit 5, heat_stab bit 4
        regs = {"0xd0": "61", "0x1d": "80", "0x89": trimming, "0xe1": trimming[:47], "0x00": "10 20 30 40 50",
                "0x1f": f"65 5a c0 7e ed 00 6a 00 00 00 00 80 {gas_lsb}"}
        bus = sa.RegisterImageBus({"0x77": {"registers": regs}})
        assert sa.detect_chip(bus) == (0x77, "bme680")
        metrics = sa.read_bosch(bus, 0x77, "bme680")
        assert {"temperature_c", "pressure_hpa", "humidity_pct"} <= set(metrics)
        assert ("gas_ohm" in metrics) is stable


def test_agent_imports_nothing_of_pibake_or_its_dependencies():
    """The agent runs on a bare Pi: stdlib (+ the drivers, loaded only when a sensor is found)."""
    import subprocess
    import sys

    from tests.firstboot.sensorkit import AGENT_FILE

    code = ("import json, runpy, sys; runpy.run_path(sys.argv[1], run_name='sensor_agent'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pibake', 'flask', 'click', 'jinja2', 'yaml', 'requests', 'psutil', 'bme280', 'smbus2', 'bme680'))))")
    out = subprocess.run([sys.executable, "-c", code, str(AGENT_FILE)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
