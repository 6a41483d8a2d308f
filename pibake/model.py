"""Plain data the whole of pibake passes around. No I/O here.

``Cluster`` is cluster.yaml after validation; ``PlannedNode`` is one line of a
hostname/IP plan; ``SeedSecrets`` is what a seed must carry so a node can enrol.
"""

from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("manager", "worker", "sensor")

# Image family decides what the seed looks like (network renderer, boot partition name).
FAMILIES = ("raspios", "ubuntu")

# The boards `pibake burn --board` knows and the architecture each runs: the Pi Zero and Zero W are ARMv6
# (32-bit only: armhf); every later board runs arm64 (pibake.bake.images.image_for_board picks the image).
ARCHES = ("arm64", "armhf")
BOARDS = {"zero": "armhf", "zero-w": "armhf", "zero2-w": "arm64", "pi3": "arm64", "pi4": "arm64", "pi5": "arm64"}


@dataclass(frozen=True)
class Wifi:
    country: str  # ISO 3166 alpha-2, upper case, e.g. "DE"
    ssid: str
    psk: str  # the WPA PSK as 64 hex digits (PBKDF2 of passphrase and SSID), never the passphrase


@dataclass(frozen=True)
class Cluster:
    """A validated cluster.yaml."""

    name: str
    manager: str  # manager hostname, e.g. "red00"
    manager_ip: str  # e.g. "10.1.1.10"
    network: str  # CIDR, e.g. "10.1.1.0/24"
    gateway: str | None = None
    dns: tuple[str, ...] = ()
    user: str = "pi"
    ssh_keys: tuple[str, ...] = ()
    timezone: str = "Etc/UTC"
    locale: str = "C.UTF-8"
    wifi: Wifi | None = None
    image: str = "raspios-trixie-lite-arm64"  # catalog name or a path to an image file
    family: str = "raspios"  # one of FAMILIES; from the catalog, or set in cluster.yaml for a local image
    ntp_servers: tuple[str, ...] = ()
    registry_port: int = 8443
    directory: Path | None = field(default=None, compare=False)
    switches: tuple["SwitchConfig", ...] = ()  # smart plugs/relays, see docs/switches.md
    mqtt: "MqttSettings" = field(default_factory=lambda: MqttSettings())  # the broker, see docs/mqtt.md
    boards: tuple[tuple[str, str], ...] = ()  # (hostname, board) from cluster.yaml's nodes:
    apt_cache: bool = False  # apt-cacher-ng on the manager; the other nodes fetch through it (docs/apt-cache.md)

    def board_of(self, hostname):
        """The board cluster.yaml's ``nodes:`` gives ``hostname`` (a key of BOARDS), or None."""
        return dict(self.boards).get(hostname)

    @property
    def registry_url(self):
        return f"https://{self.manager}:{self.registry_port}"


@dataclass(frozen=True)
class MqttSettings:
    """cluster.yaml's ``mqtt:`` section: Mosquitto on the manager (pibake.mqtt), see docs/mqtt.md."""

    enabled: bool = False
    port: int = 8883
    discovery_prefix: str = "homeassistant"  # Home Assistant's MQTT discovery prefix
    base: str = "pibake"  # nodes publish under <base>/<hostname>/...


@dataclass(frozen=True)
class PlannedNode:
    """One card/host: a hostname paired with an IP and a role."""

    hostname: str
    ip: str
    role: str = "worker"


@dataclass(frozen=True)
class SeedSecrets:
    """What a node's seed carries so it can enrol (the join token only enrols and expires), and the manager's
    public ssh key, which the seed authorizes for the cluster user (from the manager's IP only)."""

    join_token: str
    ca_cert_pem: str
    manager_ssh_key: str | None = None


@dataclass(frozen=True)
class Seed:
    """The three NoCloud files, as text."""

    user_data: str
    meta_data: str
    network_config: str
    instance_id: str

    def files(self):
        """{file name on the boot partition: text}."""
        return {
            "user-data": self.user_data,
            "meta-data": self.meta_data,
            "network-config": self.network_config,
        }


SWITCH_DRIVERS = ("kasa", "shelly", "tasmota")


@dataclass(frozen=True)
class SwitchConfig:
    """One entry of ``switches:`` in cluster.yaml: a smart plug or relay and what it powers."""

    name: str
    driver: str  # one of SWITCH_DRIVERS
    address: str  # host or host:port of the device's local API
    channel: int = 0  # outlet/relay number on multi-channel devices (Shelly switch id, Tasmota POWER<n>)
    node: str | None = None  # the node it powers, or
    thing: str | None = None  # what else it powers ("network switch", "fan")
    auto_cycle: bool = False  # the manager may power-cycle it by itself to recover `node`
    mqtt_broker: str | None = None  # Tasmota over MQTT: broker host:port, and
    mqtt_topic: str | None = None  # the device's topic (cmnd/<topic>/POWER)
    mqtt_tls: bool = False  # TLS to the broker, its certificate checked against the cluster CA
    timeout: float | None = None  # seconds per request to the device

    @property
    def host(self):
        return self.address.rsplit(":", 1)[0] if self.address.count(":") == 1 else self.address

    @property
    def port(self):
        return int(self.address.rsplit(":", 1)[1]) if self.address.count(":") == 1 else None

    @property
    def powers(self):
        return f"node {self.node}" if self.node else (self.thing or "")
