"""Helpers for the sensor agent's tests: load the agent file as the node runs it, build register images."""

import importlib.util
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENT_FILE = ROOT / "firstboot" / "sensor_agent.py"
FIXTURES = ROOT / "tests" / "fixtures" / "sensors"


def load_agent():
    """The agent module from its file (the node has no pibake package: it runs the file by itself)."""
    if "sensor_agent" in sys.modules:
        return sys.modules["sensor_agent"]
    spec = importlib.util.spec_from_file_location("sensor_agent", AGENT_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sensor_agent"] = module
    spec.loader.exec_module(module)
    return module


# The worked example of the BMP280 datasheet (Bosch BST-BMP280-DS001, "compensation formula" example)
DATASHEET = {"T": (27504, 26435, -1000), "P": (36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000),
             "adc_T": 519888, "adc_P": 415148}


def register_image(chip_id, t_cal, p_cal, adc_t, adc_p, *, address=0x76, stuck=False):
    """A register image (the agent's sim_bus format) of a BMP280-style chip with these trimming values and raw
    20-bit readings: calibration little-endian words from 0x88, data registers from 0xF7 (msb, lsb, xlsb)."""
    cal = struct.pack("<Hhh", *t_cal) + struct.pack("<Hhhhhhhhh", *p_cal)
    data = (adc_p << 4).to_bytes(3, "big") + (adc_t << 4).to_bytes(3, "big") + b"\x80\x00"
    return {"devices": {f"0x{address:02x}": {"registers": {"0x88": cal.hex(" "), "0xd0": f"{chip_id:02x}",
                                                           "0xf7": data.hex(" ")},
                                             "stuck_measuring": stuck}}}
