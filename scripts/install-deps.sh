#!/usr/bin/env bash
# Installs Tessera's build and test dependencies from Debian 12's archive (needs root or sudo).
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config ccache
  libopencv-dev libeigen3-dev libtbb-dev libstb-dev catch2 nlohmann-json3-dev libcli11-dev
  xvfb xauth imagemagick xdotool
  fonts-dejavu-core  # DejaVu Sans: the font of every label, legend and caption
  opencv-doc  # digits.png and the sample photos: training data, digit scenes, their tests
  openmpi-bin libopenmpi-dev  # data-parallel tessera train (mpirun); the build uses MPI when present
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
