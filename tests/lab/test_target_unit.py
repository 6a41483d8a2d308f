"""Pure parts of the arm64 target: the firmware's view of a card, qemu's command line, the image recipe."""


import pytest

from pibake.lab import target, vm

RASPIOS_CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=1a2b3c4d-02 rootfstype=ext4 "
                   "fsck.repair=yes rootwait cfg80211.ieee80211_regdom=GB\n")


def test_vm_cmdline_maps_the_firmware_aliases_and_keeps_the_root():
    line = vm.vm_cmdline(RASPIOS_CMDLINE)
    words = line.split()
    assert "console=ttyAMA0,115200" in words
    assert not any(w.startswith("console=tty1") or "serial0" in w for w in words)
    assert "root=PARTUUID=1a2b3c4d-02" in words and "rootwait" in words
    assert words[-2:] == ["net.ifnames=0", f"systemd.default_device_timeout_sec={vm.DEVICE_TIMEOUT_S}"]


@pytest.mark.parametrize("cmdline, expected", [
    ("root=/dev/vda2 rootwait", ["root=/dev/vda2", "rootwait", "console=ttyAMA0,115200", "net.ifnames=0",
                                 "systemd.default_device_timeout_sec=900"]),
    ("console=tty1 root=LABEL=writable net.ifnames=1 systemd.default_device_timeout_sec=60",
     ["root=LABEL=writable", "net.ifnames=1", "systemd.default_device_timeout_sec=60", "console=ttyAMA0,115200"]),
])
def test_vm_cmdline_adds_a_serial_console_and_keeps_a_given_ifnames(cmdline, expected):
    assert vm.vm_cmdline(cmdline).split() == expected


@pytest.mark.parametrize("config, expected", [
    (target.CONFIG_TXT, ("kernel8.img", "initramfs8")),
    ("[all]\nkernel=vmlinuz\ncmdline=cmdline.txt\ninitramfs initrd.img followkernel\n", ("vmlinuz", "initrd.img")),
    ("# nothing\n", ("kernel8.img", None)),
    ("[pi5]\nkernel=kernel_2712.img\n[all]\nauto_initramfs=1\n", ("kernel8.img", "initramfs8")),
])
def test_config_txt_files_follow_the_firmware_defaults(config, expected):
    assert vm.config_txt_files(config) == expected


def test_qemu_argv_boots_the_card_on_a_tap_without_other_networks(tmp_path):
    boot = vm.FirmwareBoot(kernel=tmp_path / "kernel8.img", initrd=tmp_path / "initramfs8", cmdline="root=x")
    argv = vm.qemu_argv(boot=boot, image=tmp_path / "red01.img", tap="pk1-tap", mac="02:77:0a:00:00:0b",
                        serial_log=tmp_path / "serial.log", qmp=tmp_path / "qmp.sock")
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-M") + 1] == "virt" and argv[argv.index("-cpu") + 1] == "cortex-a72"
    assert argv[argv.index("-initrd") + 1] == str(tmp_path / "initramfs8")
    assert f"file={tmp_path / 'red01.img'},format=raw" in argv[argv.index("-drive") + 1]
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a in ("-netdev", "-nic")]
    assert netdevs == ["tap,id=net0,ifname=pk1-tap,script=no,downscript=no"]
    assert "kvm" not in " ".join(argv)
    no_net = vm.qemu_argv(boot=boot, image="x.img", serial_log="s", qmp="q")
    assert no_net[no_net.index("-nic") + 1] == "none" and "-netdev" not in no_net


def test_strip_escapes_cleans_console_lines():
    assert vm.strip_escapes("\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[1mMulti-User\x1b[0m.\r") == \
        "  OK  ] Reached target Multi-User."


def test_recipe_key_changes_with_what_the_image_contains():
    base = target.recipe_key()
    assert base == target.recipe_key()
    assert target.recipe_key(packages=target.BASE_PACKAGES) != base
    assert target.recipe_key(release="bookworm") != base
    assert len(target.disk_id_for(base)) == 8 and target.disk_id_for(base) != target.disk_id_for(base + "x")


def test_fstab_mounts_the_boot_partition_where_cloud_init_reads_the_seed():
    fstab = target.fstab_for("1a2b3c4d")
    assert "PARTUUID=1a2b3c4d-01  /boot/firmware  vfat" in fstab
    assert "PARTUUID=1a2b3c4d-02  /               ext4" in fstab
    assert "seedfrom: file:///boot/firmware" in target.RPI_CLOUD_CFG
    assert "datasource_list: [ NoCloud, None ]" in target.RPI_CLOUD_CFG


def test_parse_dpkg_status_reads_installed_versions_only():
    status = ("Package: cloud-init\nStatus: install ok installed\nVersion: 25.1.4-1\n\n"
              "Package: slurmd\nStatus: deinstall ok config-files\nVersion: 24.11.5-1\n\n"
              "Package: python3\nStatus: install ok installed\nArchitecture: arm64\nVersion: 3.13.5-1\n")
    assert target.parse_dpkg_status(status) == {"cloud-init": "25.1.4-1", "python3": "3.13.5-1"}


def test_image_size_leaves_headroom_and_is_aligned():
    size = target.image_size_for(1_000_000_000, 512 * 2**20)
    assert size % (64 * 2**20) == 0
    assert size >= 1_000_000_000 + 512 * 2**20 + target.IMAGE_HEADROOM


def test_binfmt_status_says_what_is_missing(tmp_path):
    assert "not mounted" in target.binfmt_status(binfmt_dir=tmp_path)
    (tmp_path / "register").write_text("")
    assert "no qemu-aarch64 entry" in target.binfmt_status(binfmt_dir=tmp_path)
    (tmp_path / "qemu-aarch64").write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    assert "disabled" in target.binfmt_status(binfmt_dir=tmp_path)
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    assert target.binfmt_status(binfmt_dir=tmp_path) is None


def test_ensure_binfmt_explains_a_missing_qemu(tmp_path):
    with pytest.raises(target.TargetError, match="apt-get install qemu-user-static"):
        target.ensure_binfmt(binfmt_dir=tmp_path, conf_dir=tmp_path / "none")
