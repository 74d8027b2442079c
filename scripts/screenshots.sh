#!/usr/bin/env bash
# Regenerates docs/screenshots/hparams.png, custom_scalars.png, projector.png, alerts.png,
# bands.png and by_tokens.png.
#
# Trains two short quickstart runs with `tbx-lightning fit`, serves them with a real
# TensorBoard on 127.0.0.1 and photographs the HParams, Custom Scalars and projector
# dashboards, then the Text dashboard of a short alerts_demo run, in headless Chromium
# (/usr/bin/chromium, or set TBX_CHROMIUM). Nothing is sent anywhere. Usage, from the
# repository root:
#
#     scripts/screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TBX_UPDATE_SCREENSHOTS=1 python -m pytest tests/test_browser.py -m browser -q -p no:cacheprovider "$@"
ls -l docs/screenshots/*.png
