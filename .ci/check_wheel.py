"""Check the built wheel's file list: the package, its type marker and the licence; no tests."""

import sys
import zipfile
from pathlib import Path

dist = Path(sys.argv[1])
(wheel,) = dist.glob("*.whl")
names = zipfile.ZipFile(wheel).namelist()
required = ["wsss_blocks/__init__.py", "wsss_blocks/py.typed", "wsss_blocks/cam.py", "wsss_blocks/cpews/__init__.py"]
missing = [n for n in required if n not in names]
licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")]
stray = [n for n in names if n.split("/")[0] in {"tests", "examples", "benchmarks", "docs"}]
assert not missing, f"{wheel.name}: missing {missing}"
assert licence, f"{wheel.name}: no LICENSE in the dist-info"
assert not stray, f"{wheel.name}: files outside the package: {stray[:5]}"
print(f"{wheel.name}: {len(names)} files, package + py.typed + LICENSE, nothing else")
(sdist,) = dist.glob("*.tar.gz")
print(f"{sdist.name}: built")
