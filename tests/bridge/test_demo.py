"""The demo's pure parts: config parsing, the boot sector, reading the guest's lines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bridge import demo, demo_scripts, serve

# The disk on libvfio-user, the NIC native.
DISK_ON_LVU = """
[guest]
xl_config = "CFG"
[disk]
image = "/srv/a.img"
engine = "libvfio-user"
[nic]
tap = "t0"
"""


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "g.cfg").write_text('name = "web1"\ntype = "hvm"\n')
    path = tmp_path / "demo.toml"
    path.write_text(text.replace("CFG", str(tmp_path / "g.cfg")))
    return path


def test_plan_from_config_takes_the_name_from_the_xl_config(tmp_path: Path) -> None:
    plan = serve.load_plan(_write(tmp_path, """
[guest]
xl_config = "CFG"
marker = "done"
[disk]
image = "/srv/a.img"
[nic]
tap = "t0"
host_address = "169.254.1.1/24"
"""))
    assert plan.name == "web1" and plan.launcher == "process"
    assert serve.bridge_argv(plan) == [
        "--domain", "web1", "--device", "00:05.0=unix:/run/xdev/ahci-demo.sock",
        "--device", "00:06.0=unix:/run/xdev/e1000-demo.sock"]
    # DMA by messages through the bridge unless foreign_dma asks otherwise
    assert serve.server_argv(plan, "ahci") == ["--disk", "file=/srv/a.img"]
    assert serve.server_argv(plan, "e1000") == ["--mac", "52:54:00:12:34:56",
                                                "--netdev", "tap,ifname=t0"]


def test_foreign_dma_only_when_asked(tmp_path: Path) -> None:
    plan = serve.load_plan(_write(tmp_path, DISK_ON_LVU + "[run]\nforeign_dma = true\n"))
    # root in dom0 may map the guest; libvfio-user answers VERSION itself
    assert serve.server_argv(plan, "e1000")[-2:] == ["tap,ifname=t0", "--xen-foreign-dma"]
    assert "--xen-foreign-dma" not in serve.server_argv(plan, "ahci")


def test_direct_ioreq_only_when_asked(tmp_path: Path) -> None:
    plan = serve.load_plan(_write(tmp_path, DISK_ON_LVU + "[run]\ndirect_ioreq = true\n"))
    assert serve.server_argv(plan, "e1000")[-1] == "--xen-ioreq"
    assert "--xen-ioreq" not in serve.server_argv(plan, "ahci")  # libvfio-user's engine


def test_log_level_for_every_daemon_or_one(tmp_path: Path) -> None:
    base = '[guest]\nxl_config = "CFG"\n[nic]\ntap = "t0"\n[disk]\nimage = "/a"\n'
    plan = serve.load_plan(_write(tmp_path, base + 'log_level = "debug"\n'
                                  '[run]\nlog_level = "warning"\n'))
    assert serve.server_argv(plan, "ahci")[-2:] == ["--log-level", "debug"]
    assert serve.server_argv(plan, "e1000")[-2:] == ["--log-level", "warning"]
    assert serve.bridge_argv(plan)[2:4] == ["--log-level", "warning"]
    plan = serve.load_plan(_write(tmp_path, base))
    assert "--log-level" not in serve.server_argv(plan, "ahci") + serve.bridge_argv(plan)


def test_engine_reaches_both_servers_or_the_one_that_names_it(tmp_path: Path) -> None:
    plan = serve.load_plan(_write(tmp_path, """
[guest]
xl_config = "CFG"
[disk]
image = "/srv/a.img"
[nic]
tap = "t0"
[run]
engine = "libvfio-user"
"""))
    for kind in ("ahci", "e1000"):
        assert serve.server_argv(plan, kind)[-2:] == ["--engine", "libvfio-user"]
    plan = serve.load_plan(_write(tmp_path, DISK_ON_LVU))
    assert serve.server_argv(plan, "ahci")[-2:] == ["--engine", "libvfio-user"]
    assert serve.server_argv(plan, "e1000")[-1] == "tap,ifname=t0"


@pytest.mark.parametrize("text, message", [
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/a"\n[run]\nforeign_dma = "yes"\n',
     "true or false"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/var/lib/xdev/images/a.img"\n[run]\n'
     'foreign_dma = true\nlauncher = "systemd"\n', "needs launcher"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/a"\n[run]\ndirect_ioreq = 1\n',
     "true or false"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/var/lib/xdev/images/a.img"\n[run]\n'
     'direct_ioreq = true\nlauncher = "systemd"\n', "needs launcher"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/a"\nimgae = "/b"\n', "unknown key"),
    ('[guest]\nxl_config = "CFG"\n[disks]\nimage = "/a"\n', "unknown section"),
    ('[guest]\nxl_config = "CFG"\n', "nothing to serve"),
    ('[disk]\nimage = "/a"\n', "needs xl_config"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/srv/a.img"\n[run]\nlauncher = "systemd"\n',
     "/var/lib/xdev/images"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/a"\n[run]\nlauncher = "docker"\n',
     "launcher"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/a"\n[run]\nengine = "spdk"\n',
     "engine must be"),
    ('[guest]\nxl_config = "CFG"\n[disk]\nimage = "/a"\nlog_level = "loud"\n',
     "log_level must be"),
    ("[guest\n", "cannot read"),
])
def test_bad_configs_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(serve.ServeError, match=message):
        serve.load_plan(_write(tmp_path, text))


def test_boot_sector_is_a_valid_mbr_carrying_the_marker() -> None:
    sector = demo_scripts.boot_sector()
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    assert demo_scripts.BOOT_MARKER.encode() in sector
    # mov si, imm16 points at the message where the BIOS loads the sector.
    si = int.from_bytes(sector[7:9], "little")
    assert sector[si - 0x7C00:].startswith(demo_scripts.BOOT_MARKER.encode())


def test_pattern_names_its_offsets() -> None:
    block = demo_scripts.pattern_block()
    assert len(block) == 1 << 20
    assert block[0x1230:0x1240] == b"xdev000000001230"


def test_cd_image_is_an_iso9660_volume_of_numbered_sectors(tmp_path: Path) -> None:
    cd = demo_scripts.cd_image()
    assert len(cd) == demo_scripts.CD_SECTORS * 2048
    pvd = cd[16 * 2048:17 * 2048]
    assert pvd[:7] == b"\x01CD001\x01" and cd[17 * 2048:17 * 2048 + 7] == b"\xffCD001\x01"
    assert pvd[40:72].rstrip() == demo_scripts.CD_VOLUME.encode()
    assert int.from_bytes(pvd[80:84], "little") == demo_scripts.CD_SECTORS
    assert cd[300 * 2048:300 * 2048 + 22] == b"xdev cd sector 000300;"
    if shutil.which("blkid"):  # util-linux: what Linux's own probing makes of it
        path = tmp_path / "cd.iso"
        path.write_bytes(cd)
        out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], capture_output=True,
                             text=True, check=True).stdout
        assert "TYPE=iso9660" in out and f"LABEL={demo_scripts.CD_VOLUME}" in out


def test_files_check_names_each_wrong_block_and_what_it_holds() -> None:
    src = demo_scripts.files_source()
    size = demo_scripts.FILE_BLOCKS * 4096
    assert len(src) == demo_scripts.FILES * size
    assert len(src) % (1 << 20) == 0  # the guest reads it in whole MiB
    files = {f"file{i}": bytearray(src[i * size:(i + 1) * size])
             for i in range(demo_scripts.FILES)}
    assert files["file3"][5 * 4096:5 * 4096 + 22] == b"xdev file 03 block 05;"
    assert demo_scripts.check_files(files.get) == "ok"
    files["file3"][5 * 4096:6 * 4096] = demo_scripts.file_block(7, 1)  # misdirected
    files["file4"][0:4096] = bytes(4096)  # lost
    files["file5"][100] ^= 1
    del files["file6"]
    verdict = demo_scripts.check_files(files.get)
    assert verdict.startswith("4 bad: ")
    assert "file3 block 5: sectors " + ",".join(["f07b01"] * 8) in verdict
    assert "file4 block 0: zeros" in verdict and "file6: missing" in verdict
    assert "file5 block 0: sectors f05b00," + ",".join(["ok"] * 7) in verdict
    files["file7"][4096 + 512:4096 + 1024] = bytes(512)
    files["file7"][4096 + 1024:4096 + 1536] = b"\xff" * 512
    assert "file7 block 1: sectors ok,zero,?,ok,ok,ok,ok,ok" in demo_scripts.check_files(files.get)


def test_guest_lines_parse_and_lspci_lines_join() -> None:
    serial = ("noise\nXDEV 1.50 found-by boot\nXDEV 1.60 lspci 0000:00:00.0 0600: 8086:1237\r\n"
              "XDEV 1.61 lspci 0000:00:05.0 0106: 8086:2922\nXDEV 2.00 mount 0\n")
    found = demo_scripts.parse_guest(serial)
    assert found["found-by"] == (1.5, "boot")
    assert found["lspci"][1].splitlines() == ["0000:00:00.0 0600: 8086:1237",
                                              "0000:00:05.0 0106: 8086:2922"]
    assert found["mount"] == (2.0, "0")


def test_report_counts_failed_checks(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.print_report("XDEV 1.0 ahci-driver ahci\n", "", "") is False
    out = capsys.readouterr().out
    assert "checks passed; failed:" in out and "pattern read" in out


def test_config_without_a_xen_host_is_refused(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(demo, "xen_host_present", lambda: False)
    assert demo.main(["--config", str(tmp_path / "x.toml")]) == 2


def test_units_keep_message_dma(tmp_path: Path) -> None:
    plan = serve.load_plan(_write(tmp_path, """
[guest]
xl_config = "CFG"
[disk]
image = "/var/lib/xdev/images/a.img"
[run]
launcher = "systemd"
"""))
    # the units' sandbox cannot map the guest: no --xen-foreign-dma
    assert serve.server_argv(plan, "ahci") == ["--disk", "file=/var/lib/xdev/images/a.img"]


def test_commands_printing_bytes_that_are_not_utf8_do_not_end_the_run() -> None:
    """xl has printed such bytes on stderr; serve.py polls it every second
    while the guest runs."""
    done = serve.sh("sh", "-c", r"printf 'ok\n'; printf 'bad \246 byte\n' >&2; exit 3",
                    check=False)
    assert done.returncode == 3 and done.stdout == "ok\n" and "bad" in done.stderr
    with pytest.raises(serve.ServeError, match=r"bad .* byte"):
        serve.sh("sh", "-c", r"printf 'bad \246 byte\n' >&2; exit 1")


def test_an_xl_that_does_not_answer_does_not_end_the_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A starved dom0 kept 'xl domid' 60 s once, while the guest finished:
    that poll says nothing, and the marker is still looked for."""
    serial = tmp_path / "serial"
    serial.write_text("booting\n")
    polls: list[str] = []

    def slow_xl(*argv: str, **_kw: object) -> None:
        polls.append(argv[0])
        serial.write_text("booting\nDONE\n")  # the guest finished meanwhile
        raise serve.ServeError("xl domid g: no answer within 60 s")

    monkeypatch.setattr(serve, "sh", slow_xl)
    plan = serve.Plan(xl_config=tmp_path / "g.cfg", name="g", serial=serial, marker="DONE",
                      timeout_s=30)
    report = serve.Report()
    assert serve.wait_for_guest(plan, report) == "marker" and polls == ["xl"]
