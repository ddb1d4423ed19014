"""A fake Kubernetes node for the PersistentVolume-label tests: PV and PVC objects as a static
provisioner makes them, and the kubelet's directories, mounts, block links, partitions and
device-mapper devices under a temporary kubelet root, where the kubelet would put them.

Used by tests/node/test_pv_labels.py and tests/prometheus (test_pv_labels_stored.py,
test_dashboard.py).
"""
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid

import yaml

from .util import sh

NODE = "test-node"  # the agent fixture's --node-name
DRIVER = "hostpath.csi.bio-test.io"


# ---------------------------------------------------------------- the API side ----------------

def pv_manifest(pv, claim=None, storage_class="fast", handle=None, local_path=None, block=False):
    spec = {
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": storage_class,
        "volumeMode": "Block" if block else "Filesystem",
    }
    if claim:
        spec["claimRef"] = {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                            "namespace": claim[0], "name": claim[1]}
    if local_path:
        spec["local"] = {"path": local_path}
        spec["nodeAffinity"] = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}]}]}}
    else:
        spec["csi"] = {"driver": DRIVER, "volumeHandle": handle or f"vol-{uuid.uuid4()}"}
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv}, "spec": spec}


def pvc_manifest(claim, pv, storage_class="fast", block=False):
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"namespace": claim[0], "name": claim[1]},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                     "storageClassName": storage_class, "volumeName": pv,
                     "volumeMode": "Block" if block else "Filesystem"}}


def create_pv(cluster, pv, claim=None, **kw):
    """The PV, and when it names a claim, that claim bound to it (as a static provisioner does)."""
    docs = [pv_manifest(pv, claim, **kw)]
    if claim:
        docs.append(pvc_manifest(claim, pv, kw.get("storage_class", "fast"), kw.get("block", False)))
    cluster.apply(yaml.safe_dump_all(docs))


def rebind(cluster, pv, old, new, block=True):
    """The claim `old` is deleted and the (Retained, now Released) PV handed to the claim `new`."""
    cluster.kubectl("delete", "pvc", "-n", old[0], old[1], "--wait=true", "--timeout=60s")
    ref = {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": new[0], "name": new[1]}
    cluster.kubectl("patch", "pv", pv, "--type=json",
                    "-p", json.dumps([{"op": "replace", "path": "/spec/claimRef", "value": ref}]))
    cluster.apply(yaml.safe_dump(pvc_manifest(new, pv, block=block)))


# ---------------------------------------------------------------- the node side ---------------

def mounts_under(path):
    prefix = os.path.realpath(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p.startswith(prefix)]


def sha256_hex(s):
    return hashlib.sha256(s.encode()).hexdigest()


def mkfs(dev):
    sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)


class Node:
    """One test's kubelet directories, mounts, links, partitions and dm devices, undone in reverse."""

    def __init__(self, root, scratch):
        self.root = root
        self.scratch = scratch
        self.undo = []

    def pod(self):
        uid = str(uuid.uuid4())
        path = os.path.join(self.root, "pods", uid)
        os.makedirs(path)
        self.undo.append(lambda: self._remove_tree(path))
        return uid

    def mount(self, src, point, *options):
        os.makedirs(point, exist_ok=True)
        sh("mount", *options, src, point)
        self.undo.append(lambda: self.umount(point))
        return point

    @staticmethod
    def umount(point):
        if sh("umount", point, check=False).returncode != 0:
            sh("umount", "-l", point, check=False)

    def _remove_tree(self, path):
        # Never delete through a mount that is still there (it would empty the filesystem).
        if os.path.lexists(path) and not mounts_under(path):
            shutil.rmtree(path, ignore_errors=True)

    def csi_pod_volume(self, uid, volume, dev=None, bind_from=None, mode="Persistent", handle=None):
        """pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount with its vol_data.json."""
        d = os.path.join(self.root, "pods", uid, "volumes", "kubernetes.io~csi", volume)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "vol_data.json"), "w") as f:
            json.dump({"attachmentID": "", "driverName": DRIVER, "nodeName": NODE, "specVolID": volume,
                       "volumeHandle": handle or volume, "volumeLifecycleMode": mode}, f)
        if bind_from:
            return self.mount(bind_from, os.path.join(d, "mount"), "--bind")
        return self.mount(dev, os.path.join(d, "mount"))

    def csi_staging(self, dev, handle):
        """plugins/kubernetes.io/csi/<driver>/<sha256(handle)>/globalmount, as NodeStageVolume leaves it."""
        d = os.path.join(self.root, "plugins", "kubernetes.io", "csi", DRIVER.replace("/", "~"), sha256_hex(handle))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "vol_data.json"), "w") as f:
            json.dump({"driverName": DRIVER, "volumeHandle": handle}, f)
        self.undo.append(lambda: self._remove_tree(d))
        return self.mount(dev, os.path.join(d, "globalmount"))

    def local_volume(self, uid, pv, source_dir):
        point = os.path.join(self.root, "pods", uid, "volumes", "kubernetes.io~local-volume", pv)
        return self.mount(source_dir, point, "--bind")

    def block_link(self, uid, pv, dev_path, plugin="kubernetes.io~csi"):
        d = os.path.join(self.root, "pods", uid, "volumeDevices", plugin)
        os.makedirs(d, exist_ok=True)
        link = os.path.join(d, pv)
        os.symlink(dev_path, link)
        self.undo.append(lambda: os.path.lexists(link) and os.unlink(link))
        return link

    def outside(self, what):
        """A directory outside the kubelet root (a local disk's mount point)."""
        path = os.path.join(self.scratch, f"{what}-{uuid.uuid4().hex[:6]}")
        os.makedirs(path)
        return path

    def partitions(self, loop, sectors):
        """addpart (BLKPG): this kernel parses no partition tables. (start, length) in 512 B sectors."""
        names = []
        for i, (start, length) in enumerate(sectors, 1):
            sh("addpart", loop.path, str(i), str(start), str(length))
            self.undo.append(lambda i=i: sh("delpart", loop.path, str(i), check=False))
            names.append(f"{loop.name}p{i}")
        for n in names:
            deadline = time.monotonic() + 10
            while not os.path.exists(f"/dev/{n}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.path.exists(f"/dev/{n}"), f"/dev/{n} did not appear"
        return names

    def dm_linear(self, loop):
        """A device-mapper linear target over the whole loop device; its kernel name (dm-N)."""
        dm_name = f"bio-test-{uuid.uuid4().hex[:8]}"
        sectors = int(sh("blockdev", "--getsz", loop.path).stdout)
        env = dict(os.environ, DM_DISABLE_UDEV="1")
        r = subprocess.run(["dmsetup", "create", dm_name, "--noudevsync", "--table", f"0 {sectors} linear {loop.path} 0"],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, f"dmsetup create: {r.stderr}"
        self.undo.append(lambda: subprocess.run(["dmsetup", "remove", "--noudevsync", dm_name],
                                                capture_output=True, env=env))
        minor = sh("dmsetup", "info", "-c", "--noheadings", "-o", "minor", dm_name, env=env).stdout.strip()
        return f"dm-{int(minor)}"

    def cleanup(self):
        errors = []
        for undo in reversed(self.undo):
            try:
                undo()
            except Exception as e:  # keep undoing the rest
                errors.append(e)
        assert not errors, errors
