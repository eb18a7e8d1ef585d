"""Unit tests for the emulated host's pure parts: no debootstrap, no QEMU."""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

import pytest

from bridge.emuhost.cli import parse_args
from bridge.emuhost.cpio import CpioError, CpioWriter
from bridge.emuhost.errors import BootError, MissingHostTool
from bridge.emuhost.guest import GuestConfigError, HvmGuest, parse_modules_dep, resolve_modules
from bridge.emuhost.image import Image, check_host_tools, find_mirror
from bridge.emuhost.machine import BootConfig, Share, check_shares, qemu_command
from bridge.emuhost.recipe import DEFAULT_PACKAGES, OverlayFile, Recipe, default_overlay
from bridge.emuhost.session import prepare_job, prepare_session_dir


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """Independent newc reader (kernel buffer-format.rst) to check the writer."""
    members: list[tuple[str, int, bytes]] = []
    offset = 0
    while True:
        header = data[offset : offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        data_start = (name_start + namesize + 3) & ~3
        body = data[data_start : data_start + filesize]
        offset = (data_start + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert offset == len(data)
            return members
        members.append((name, mode, body))


def test_cpio_members_round_trip() -> None:
    writer = CpioWriter()
    writer.add_dir("usr/bin", parents=True)
    writer.add_file("usr/bin/x", b"abcde", 0o755)
    writer.add_symlink("bin", "usr/bin")
    members = read_newc(writer.render())
    assert [m[0] for m in members] == ["usr", "usr/bin", "usr/bin/x", "bin"]
    assert stat.S_ISDIR(members[0][1])
    assert members[2][1] == stat.S_IFREG | 0o755 and members[2][2] == b"abcde"
    assert stat.S_ISLNK(members[3][1]) and members[3][2] == b"usr/bin"


def test_cpio_is_reproducible_and_gzipped() -> None:
    def build() -> bytes:
        writer = CpioWriter()
        writer.add_file("init", b"#!/bin/sh\n", 0o755)
        return writer.render_gzip()

    assert build() == build()
    assert read_newc(gzip.decompress(build()))[0][0] == "init"


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/../../b"])
def test_cpio_rejects_bad_names(name: str) -> None:
    with pytest.raises(CpioError):
        CpioWriter().add_file(name, b"")


def test_cpio_rejects_duplicates() -> None:
    writer = CpioWriter()
    writer.add_file("init", b"")
    with pytest.raises(CpioError):
        writer.add_file("/init", b"")


def test_recipe_digest_is_stable_and_sensitive() -> None:
    base = Recipe()
    assert base.digest() == Recipe().digest()
    assert Recipe(packages=tuple(reversed(DEFAULT_PACKAGES))).digest() == base.digest()
    assert Recipe(packages=(*DEFAULT_PACKAGES, "strace")).digest() != base.digest()
    assert Recipe(suite="trixie").digest() != base.digest()
    changed = (*default_overlay(), OverlayFile("/etc/motd", b"hi\n"))
    assert Recipe(overlay=changed).digest() != base.digest()
    edited = tuple(
        OverlayFile(f.path, f.content + b"#\n", f.mode) if f.path.endswith(".service") else f
        for f in default_overlay()
    )
    assert Recipe(overlay=edited).digest() != base.digest()


def test_find_mirror_deb822_and_one_line() -> None:
    deb822 = (
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert find_mirror([deb822], "bookworm") == "http://mirror.example/debian"
    one_line = "# comment\ndeb [arch=amd64] http://other.example/debian bookworm main contrib\n"
    assert find_mirror([one_line], "bookworm") == "http://other.example/debian"
    assert find_mirror(["deb-src http://x/debian bookworm main\n"], "bookworm") is None
    assert find_mirror([deb822], "trixie") is None


def test_xl_config_has_the_settings_tcg_needs() -> None:
    guest = HvmGuest(name="g1", init_script="echo hi", disks=("/tmp/d.img,raw,xvda,rw",),
                     device_model_args=("-device", "e1000"))
    text = guest.xl_config("/boot/vmlinuz-6.1", "/xdev/run/jobs/000")
    lines = set(text.splitlines())
    assert 'type = "hvm"' in lines
    assert 'tsc_mode = "native"' in lines
    assert 'kernel = "/boot/vmlinuz-6.1"' in lines
    assert 'serial = "file:/xdev/run/jobs/000/guests/g1.serial"' in lines
    assert 'ramdisk = "/xdev/run/jobs/000/guests/g1.initrd"' in lines
    assert 'disk = [ "/tmp/d.img,raw,xvda,rw" ]' in lines
    assert 'device_model_args = [ "-device", "e1000" ]' in lines
    assert "xen_platform_pci = 0" in lines


@pytest.mark.parametrize("bad", [{"name": "x y"}, {"name": "-x"}, {"memory_mb": 8}])
def test_guest_rejects_bad_fields(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {"name": "ok", "init_script": "true", **bad}
    with pytest.raises(GuestConfigError):
        HvmGuest(**fields)  # type: ignore[arg-type]


def test_xl_config_refuses_quote_injection() -> None:
    guest = HvmGuest(name="g", init_script="", cmdline='console=ttyS0" memory=9999 "')
    with pytest.raises(GuestConfigError):
        guest.xl_config("/boot/k")


def _fake_modules(root: Path) -> Path:
    mods = root / "lib/modules/6.1"
    (mods / "kernel").mkdir(parents=True)
    for name in ("scsi_mod", "libata", "libahci", "ahci", "e1000"):
        (mods / "kernel" / f"{name}.ko").write_bytes(name.encode())
    (mods / "modules.dep").write_text(
        "kernel/ahci.ko: kernel/libahci.ko kernel/libata.ko kernel/scsi_mod.ko\n"
        "kernel/libahci.ko: kernel/libata.ko kernel/scsi_mod.ko\n"
        "kernel/libata.ko: kernel/scsi_mod.ko\n"
        "kernel/scsi_mod.ko:\n"
        "kernel/e1000.ko:\n"
    )
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    return mods


def test_resolve_modules_orders_dependencies_first(tmp_path: Path) -> None:
    mods = _fake_modules(tmp_path)
    assert parse_modules_dep((mods / "modules.dep").read_text())["ahci"][0] == "kernel/ahci.ko"
    order = [stem for stem, _ in resolve_modules(mods, ["ahci", "libata", "e1000", "virtio"])]
    assert order == ["scsi_mod", "libata", "libahci", "ahci", "e1000"]
    with pytest.raises(GuestConfigError):
        resolve_modules(mods, ["no_such_module"])


def test_initramfs_has_busybox_modules_and_init(tmp_path: Path) -> None:
    mods = _fake_modules(tmp_path)
    guest = HvmGuest(name="g", init_script="echo MARKER-42", modules=("ahci",))
    members = {name: body for name, _, body in read_newc(gzip.decompress(
        guest.initramfs(b"\x7fELF-busybox", mods)))}
    assert members["bin/busybox"] == b"\x7fELF-busybox"
    init = members["init"].decode()
    assert init.startswith("#!/bin/busybox sh")
    assert init.index("insmod /modules/000-scsi_mod.ko") < init.index("insmod /modules/003-ahci.ko")
    load_ahci = init.index("/modules/003-ahci.ko")
    assert load_ahci < init.index("echo MARKER-42") < init.index("poweroff")
    assert members["modules/003-ahci.ko"] == b"ahci"


def _fake_image(tmp_path: Path) -> Image:
    directory = tmp_path / "image"
    directory.mkdir()
    (directory / "busybox").write_bytes(b"bb")
    _fake_modules(tmp_path)
    (directory / "modules").symlink_to(tmp_path / "lib/modules")
    return Image(directory, "0" * 16, "6.1", 0.0, 0.0)


def test_qemu_command_boots_xen_with_dom0_modules_and_shares(tmp_path: Path) -> None:
    image = _fake_image(tmp_path)
    shares = {"xdevrun": Share(tmp_path, readonly=False), "xdevrepo": Share(Path("/src"))}
    argv = qemu_command(image, BootConfig(cpu="max,-smap,-smep,-xsave"), shares,
                        console="file:/tmp/c.log")
    joined = " ".join(argv)
    assert argv[argv.index("-cpu") + 1] == "max,-smap,-smep,-xsave"
    assert argv[argv.index("-kernel") + 1] == str(image.xen)
    assert "dom0_mem=1024M,max:1024M" in argv[argv.index("-append") + 1]
    assert argv[argv.index("-initrd") + 1].startswith(f"{image.dom0_kernel} root=/dev/vda")
    assert "snapshot=on" in argv[argv.index("-drive") + 1]
    assert f"path={tmp_path},mount_tag=xdevrun,security_model=none -virtfs" in joined
    assert "mount_tag=xdevrepo,security_model=none,readonly=on" in joined
    assert "-no-reboot" in argv


def test_tcg_threading_defaults_to_multi_and_follows_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _fake_image(tmp_path)
    monkeypatch.delenv("XDEV_EMUHOST_TCG", raising=False)
    argv = qemu_command(image, BootConfig(), {}, console="file:/x")
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    monkeypatch.setenv("XDEV_EMUHOST_TCG", "single")
    argv = qemu_command(image, BootConfig(), {}, console="file:/x")
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    monkeypatch.setenv("XDEV_EMUHOST_TCG", "many")
    with pytest.raises(BootError):
        qemu_command(image, BootConfig(), {}, console="file:/x")


def test_cpu_and_xen_options_default_and_follow_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulated CPU lacks SMAP, SMEP and XSAVE unless the environment
    says otherwise; extra Xen options go after the built-in ones."""
    image = _fake_image(tmp_path)
    monkeypatch.delenv("XDEV_EMUHOST_CPU", raising=False)
    monkeypatch.delenv("XDEV_EMUHOST_XEN_ARGS", raising=False)
    argv = qemu_command(image, BootConfig(), {}, console="file:/x")
    cpu = argv[argv.index("-cpu") + 1].split(",")
    assert cpu[0] == "max" and {"-smap", "-smep", "-xsave"} <= set(cpu[1:])
    assert argv[argv.index("-append") + 1].endswith("dom0_mem=1024M,max:1024M")
    monkeypatch.setenv("XDEV_EMUHOST_CPU", "max,-smap,-smep")
    monkeypatch.setenv("XDEV_EMUHOST_XEN_ARGS", "pcid=0  xpti=false")
    argv = qemu_command(image, BootConfig(), {}, console="file:/x")
    assert argv[argv.index("-cpu") + 1] == "max,-smap,-smep"
    assert argv[argv.index("-append") + 1].endswith("dom0_mem=1024M,max:1024M pcid=0 xpti=false")


def test_qemu_command_refuses_commas_in_dom0_args(tmp_path: Path) -> None:
    image = _fake_image(tmp_path)
    with pytest.raises(BootError):
        qemu_command(image, BootConfig(dom0_args=("a=b,c",)), {}, console="file:/x")


def test_session_dir_and_job_hold_what_dom0_reads(tmp_path: Path) -> None:
    image = _fake_image(tmp_path)
    extra = tmp_path / "data"
    extra.mkdir()
    session = tmp_path / "session"
    shares = prepare_session_dir(session, check_shares({"data": Share(extra, readonly=False)}))
    assert set(shares) == {"xdevrun", "xdevrepo", "data"}
    assert shares["xdevrun"].path == session and not shares["xdevrun"].readonly
    assert shares["xdevrepo"].readonly
    assert "xl info" in (session / "boot.sh").read_text()
    assert "xdev_guest_wait()" in (session / "lib/emuhost.sh").read_text()
    assert (session / "shares").read_text() == "xdevrepo /xdev/repo ro\ndata /xdev/data rw\n"

    guest = HvmGuest(name="g", init_script="echo hi", modules=("e1000",))
    job = prepare_job(session, 3, image, "echo run", guests=[guest], timeout=99)
    assert job == session / "jobs/003"
    assert (job / "run.sh").read_text() == "echo run"
    assert not (job / "ready").exists()
    env = (job / "env").read_text()
    assert "export XDEV_SCRIPT_TIMEOUT=99\n" in env
    assert "export XDEV_RUN=/xdev/run/jobs/003\n" in env
    assert "export XDEV_GUEST_KERNEL=/boot/vmlinuz-6.1\n" in env
    config = (job / "guests/g.cfg").read_text()
    assert 'kernel = "/boot/vmlinuz-6.1"' in config
    assert 'ramdisk = "/xdev/run/jobs/003/guests/g.initrd"' in config
    assert (job / "guests/g.initrd").read_bytes()[:2] == b"\x1f\x8b"


def test_a_job_that_fails_to_build_leaves_no_numbered_dir(tmp_path: Path) -> None:
    image = _fake_image(tmp_path)
    guest = HvmGuest(name="g", init_script="", modules=("no_such_module",))
    prepare_session_dir(tmp_path / "s", {})
    with pytest.raises(GuestConfigError):
        prepare_job(tmp_path / "s", 0, image, "true", guests=[guest])
    assert list((tmp_path / "s/jobs").iterdir()) == []


@pytest.mark.parametrize("tag", ["xdevrun", "Bad", "a,b", ""])
def test_bad_share_tags_are_refused(tmp_path: Path, tag: str) -> None:
    with pytest.raises(BootError):
        check_shares({tag: Share(tmp_path)})


def test_missing_host_tool_names_the_package() -> None:
    with pytest.raises(MissingHostTool, match="apt-get install some-pkg"):
        check_host_tools({"surely-not-a-program-xdev": "some-pkg"})


def test_cli_parses_run_with_shares_and_guests(tmp_path: Path) -> None:
    (tmp_path / "init.sh").write_text("echo hi\n")
    config = parse_args(["--cache-dir", str(tmp_path), "run", "s.sh", "--timeout", "60",
                         "--share", f"data={tmp_path}:rw", "--guest", f"g1={tmp_path}/init.sh"])
    assert config.guests == (HvmGuest(name="g1", init_script="echo hi\n"),)
    assert config.command == "run" and config.timeout == 60
    assert config.shares["data"] == Share(tmp_path, readonly=False)
    assert config.cache_dir == tmp_path
