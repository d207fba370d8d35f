"""The published ImageNet weights of the backbones, downloaded and verified:

    python -m mmsi_jax.models.fetch resnet50 --to data/pretrained
    python -m mmsi_jax.models.fetch --list

downloads a file of `PUBLISHED` (by its name here or its file name) into the directory under its
published file name, which is the name the configs' `model.pretrained` expects, with a progress bar. The
download goes to `<file>.partial` and becomes the file only once its SHA-256 sum (and its size, where
known) is the published one; a mismatch deletes it and stops with both sums. A file already there is
verified, not downloaded again. `--mirror=URL` reads the same file names from another server (a local
copy, or a mirror of the publishers').

The sums and sizes, and where each was found, are in docs/WEIGHTS.md. torchvision names its files
`<model>-<first 8 hex digits of the SHA-256>.pth` and checks that prefix on download
(torch.hub.download_url_to_file); the full sums here are of those same files.
"""

import argparse
import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.request
from typing import Optional

CHUNK = 1 << 20  # Bytes read and hashed at a time.


@dataclasses.dataclass(frozen=True)
class Published:
  """A published weights file: where it is, its SHA-256 and size in bytes (None: not published)."""
  file_name: str
  url: str
  sha256: str
  size: Optional[int]
  what: str


PUBLISHED = {
    "bn_inception": Published(
        "bn_inception-52deb4733.pth",
        "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth",
        "52deb473314542a5c2f87e9e6f26f4ca42fe863d15f986414dbae8c2dfdd2353", None,
        "BN-Inception (Caffe, ported by pretrainedmodels as 'bninception'), ImageNet"),
    "resnet18": Published(
        "resnet18-f37072fd.pth", "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", 46_830_571,
        "torchvision ResNet-18, ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": Published(
        "resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a", 102_530_333,
        "torchvision ResNet-50, ResNet50_Weights.IMAGENET1K_V1 (the DML papers')"),
    "resnet50_v2": Published(
        "resnet50-11ad3fa6.pth", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca", 102_540_417,
        "torchvision ResNet-50, ResNet50_Weights.IMAGENET1K_V2"),
}


class ChecksumError(ValueError):
  """A downloaded or existing file is not the published one."""


def find(name: str) -> tuple[str, Published]:
  """(its name here, the published file) of `name`, a name of PUBLISHED or a published file name."""
  for key, published in PUBLISHED.items():
    if name in (key, published.file_name):
      return key, published
  raise KeyError(f"{name!r} is not a published weights file; known: "
                 f"{', '.join(f'{k} ({p.file_name})' for k, p in PUBLISHED.items())}.")


def command_for(path: str) -> Optional[str]:
  """The command that downloads the weights `path` names (by its file name), None for another file."""
  try:
    key, _ = find(os.path.basename(path))
  except KeyError:
    return None
  return f"python -m mmsi_jax.models.fetch {key} --to {os.path.dirname(path) or '.'}"


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download(url: str, path: str, sha256: str, size: Optional[int] = None,
             progress: bool = True) -> None:
  """Downloads `url` to `path` through `<path>.partial`, hashing as it goes; `path` appears only when
  the SHA-256 (and the size, if given) are the expected ones. Raises ChecksumError (the partial file
  deleted) on a mismatch, OSError (likewise) when the download fails."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  partial = f"{path}.partial"
  digest, received = hashlib.sha256(), 0
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out, tqdm(
        total=int(response.headers.get("Content-Length") or size or 0) or None, unit="B",
        unit_scale=True, unit_divisor=1024, desc=os.path.basename(path), disable=not progress,
        file=sys.stderr) as bar:
      for chunk in iter(lambda: response.read(CHUNK), b""):
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        bar.update(len(chunk))
    problems = []
    if size is not None and received != size:
      problems.append(f"{received} bytes received, {size} published")
    if digest.hexdigest() != sha256:
      problems.append(f"SHA-256 {digest.hexdigest()}, {sha256} published")
    if problems:
      raise ChecksumError(f"{url} is not the published file ({'; '.join(problems)}): refused and "
                          f"deleted. Download it again; if this persists the server is serving "
                          f"another file.")
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def fetch(name: str, directory: str, mirror: str = "", progress: bool = True) -> str:
  """The path of the published weights `name` in `directory`, downloaded (from `mirror`, a base URL
  holding the same file names, if given) and verified, or verified if already there."""
  _, published = find(name)
  path = os.path.join(directory, published.file_name)
  if os.path.exists(path):
    found = sha256_of(path)
    if found != published.sha256:
      raise ChecksumError(f"{path} exists but is not the published file (SHA-256 {found}, "
                          f"{published.sha256} published); delete it and fetch again.")
    return path
  url = f"{mirror.rstrip('/')}/{published.file_name}" if mirror else published.url
  download(url, path, published.sha256, published.size, progress)
  return path


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m mmsi_jax.models.fetch",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("names", nargs="*", help=f"Weights to fetch: {', '.join(PUBLISHED)}.")
  parser.add_argument("--to", default="data/pretrained", help="The directory to put them in.")
  parser.add_argument("--mirror", default="", help="A base URL serving the same file names.")
  parser.add_argument("--list", action="store_true", help="List the published weights.")
  args = parser.parse_args(argv)
  if args.list or not args.names:
    for key, published in PUBLISHED.items():
      size = f"{published.size:,} bytes" if published.size else "size not published"
      print(f"{key:13s} {published.file_name:28s} {size:20s} {published.what}\n"
            f"{'':13s} {published.url}\n{'':13s} sha256 {published.sha256}")
    return 0 if args.list else 2
  for name in args.names:
    try:
      path = fetch(name, args.to, args.mirror)
    except (KeyError, ChecksumError, OSError) as e:
      message = e.args[0] if isinstance(e, KeyError) else e
      print(f"Error: {name}: {message}", file=sys.stderr)
      return 1
    print(f"{path}: verified (SHA-256 {find(name)[1].sha256[:16]}...).")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
