#!/usr/bin/env bash
# End to end: a run timeline rendered by a real browser.
#
# Runs `fanout demo --timeline` (3 processors, 300 records, attempts failing
# at random with --flaky so there are retries and failures), then opens the
# page in headless Chromium from a file:// URL (no network: the page is
# self-contained) and checks the rendered DOM against the data embedded in
# the page: one lane element per processor, one bar element per attempt
# with the same record, attempt and outcome, which only the page's script
# can have drawn, each filled with its outcome's colour (four distinct
# colours). Then hovers a retried bar (a mousemove dispatched from a probe
# page framing the timeline) and checks the tooltip shows that attempt's
# record id, attempt number, duration and error. Also takes a screenshot
# (1400x900) and checks it is a PNG.
#
# Installs chromium (Debian, --no-install-recommends) and python3 with
# apt-get when missing. Builds the binaries (cargo build --release --bins)
# when the folder lacks them. Everything it writes goes to a temporary
# directory, removed on exit; pass a second argument to keep the
# screenshot there (docs/timeline.png was made so).
# Usage: tests/e2e-timeline.sh [target/release] [SCREENSHOT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
keep=${2:-}

PROCESSORS=3
RECORDS=300
MAX_IN_FLIGHT=12  # attempts in flight at once (4 a processor): bars thick enough to read
FLAKY=12          # percent of attempts that fail (transiently, so retried)
RUN_LIMIT=300     # seconds the demo may take at most
BROWSER_LIMIT=120 # seconds each browser invocation may take at most

say() { echo "e2e-timeline: $*"; }
die() { echo "e2e-timeline: FAIL: $*" >&2; exit 1; }

apt_install() { # apt_install PACKAGE...: install, with `apt-get update` only when needed
  export DEBIAN_FRONTEND=noninteractive
  say "installing $* (apt-get)"
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 && return 0
  apt-get update -q >/dev/null 2>&1 || true
  apt-get install -y -q --no-install-recommends "$@" >/dev/null || die "cannot install $* with apt-get"
}
command -v chromium >/dev/null || apt_install chromium
command -v chromium >/dev/null || die "chromium not found after installing it"
command -v python3 >/dev/null || apt_install python3
command -v timeout >/dev/null || die "timeout not found"

if [ ! -x "$bin/fanout" ]; then
  say "$bin/fanout missing: cargo build --release --bins"
  if [ "$(basename "$bin")" = release ]; then
    CARGO_TARGET_DIR=$(dirname "$bin") cargo build --release --bins
  else
    cargo build --release --bins && bin=target/release
  fi
fi
bin=$(cd "$bin" && pwd)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
page=$tmp/timeline.html

say "fanout demo: $PROCESSORS processors, $RECORDS records, --flaky $FLAKY"
set +e
timeout "$RUN_LIMIT" "$bin/fanout" demo --processors "$PROCESSORS" --records "$RECORDS" --rounds 2000 \
  --max-in-flight "$MAX_IN_FLIGHT" --flaky "$FLAKY" --quiet --timeline "$page" >"$tmp/report.txt" 2>"$tmp/demo.err"
code=$?
set -e
# 0: every record succeeded; 3: some failed after their last attempt.
[ "$code" -eq 0 ] || [ "$code" -eq 3 ] || { cat "$tmp/demo.err" >&2; die "fanout demo exited $code"; }
[ -s "$page" ] || die "no timeline page written"
grep -E '^(status|records) ' "$tmp/report.txt" | sed 's/^/e2e-timeline:   /'

browser() { # browser ARGS...: headless chromium on the page, bounded in time
  timeout "$BROWSER_LIMIT" chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
    --user-data-dir="$tmp/profile" "$@" "file://$page" 2>>"$tmp/chromium.err"
}
say "rendering in headless chromium ($(chromium --version 2>/dev/null | head -n 1))"
browser --dump-dom >"$tmp/dom.html" || { tail -5 "$tmp/chromium.err" >&2; die "chromium --dump-dom failed"; }
browser --screenshot="$tmp/timeline.png" --window-size=1400,900 >/dev/null ||
  { tail -5 "$tmp/chromium.err" >&2; die "chromium --screenshot failed"; }

# Hover: a probe page frames the timeline, moves the mouse onto the first
# retried bar, and copies what the tooltip then says into its own DOM.
cat >"$tmp/probe.html" <<'HTML'
<!DOCTYPE html><html><body>
<iframe id="f" src="timeline.html" width="1400" height="900"></iframe>
<script>
document.getElementById("f").addEventListener("load", function () {
  var d = this.contentDocument, out = document.createElement("pre");
  out.id = "probe";
  try {
    var bar = d.querySelector('rect.bar[data-outcome="retried"]'), r = bar.getBoundingClientRect();
    bar.dispatchEvent(new MouseEvent("mousemove", { bubbles: true, clientX: r.left + 1, clientY: r.top + 1 }));
    var tip = d.getElementById("tip");
    out.setAttribute("data-record", bar.getAttribute("data-record"));
    out.setAttribute("data-attempt", bar.getAttribute("data-attempt"));
    out.setAttribute("data-shown", tip.style.display);
    out.textContent = tip.innerText;
  } catch (e) { out.setAttribute("data-error", String(e)); }
  document.body.appendChild(out);
});
</script></body></html>
HTML
timeout "$BROWSER_LIMIT" chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
  --user-data-dir="$tmp/profile" --allow-file-access-from-files --virtual-time-budget=10000 --window-size=1400,900 \
  --dump-dom "file://$tmp/probe.html" >"$tmp/probe-dom.html" 2>>"$tmp/chromium.err" ||
  { tail -5 "$tmp/chromium.err" >&2; die "chromium --dump-dom of the hover probe failed"; }

python3 - "$page" "$tmp/dom.html" "$tmp/timeline.png" "$PROCESSORS" "$tmp/probe-dom.html" <<'PY'
import json, sys
from html.parser import HTMLParser

page_path, dom_path, png_path, processors = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
probe_path = sys.argv[5]

def fail(msg):
    print("e2e-timeline: FAIL: " + msg, file=sys.stderr)
    sys.exit(1)

class Collect(HTMLParser):
    """Elements with their attributes (unescaped), and script texts by id."""
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements, self.scripts, self._script = [], {}, None
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "script":
            self._script = a.get("id", "")
            self.scripts.setdefault(self._script, "")
    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None
    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] += data

page = Collect()
page.feed(open(page_path, encoding="utf-8").read())
data = json.loads(page.scripts["timeline-data"])
dom = Collect()
dom.feed(open(dom_path, encoding="utf-8").read())

bodies = [a for t, a in dom.elements if t == "body"]
if not bodies or bodies[0].get("data-rendered") != "true":
    fail("the page's script did not run to its end (no data-rendered on <body>)")

F = {f: i for i, f in enumerate(data["bar_fields"])}
lanes = [a for t, a in dom.elements if t == "g" and "lane" in a.get("class", "").split()]
bars = [a for t, a in dom.elements if t == "rect" and "bar" in a.get("class", "").split()]
names = sorted(l["name"] for l in data["lanes"])
if len(data["lanes"]) != processors:
    fail(f"{len(data['lanes'])} lanes in the data, {processors} processors ran")
if sorted(l["data-lane"] for l in lanes) != names:
    fail(f"lane elements {sorted(l['data-lane'] for l in lanes)} != lanes in the data {names}")
if len(bars) != len(data["bars"]):
    fail(f"{len(bars)} bar elements, {len(data['bars'])} attempts in the data")
want = sorted(
    (data["ids"][b[F["record"]]], str(b[F["attempt"]]), data["outcomes"][b[F["outcome"]]],
     data["lanes"][b[F["lane"]]]["name"])
    for b in data["bars"])
got = sorted((b["data-record"], b["data-attempt"], b["data-outcome"], b["data-lane"]) for b in bars)
if got != want:
    fail("the bar elements do not match the attempts in the data")
s = data["summary"]
if s["records"] != len(set(data["ids"])) or s["attempts"] != len(data["bars"]) + data["not_drawn"]:
    fail(f"summary {s} does not match the drawn attempts")
outcomes = {}
for b in bars:
    outcomes[b["data-outcome"]] = outcomes.get(b["data-outcome"], 0) + 1
if not outcomes.get("retried"):
    fail(f"no retried attempt drawn with --flaky: {outcomes}")
# Colours: every bar of one outcome has one fill, and no two outcomes share one.
fills = {}
for b in bars:
    fills.setdefault(b["data-outcome"], set()).add(b.get("fill"))
if any(len(f) != 1 or None in f for f in fills.values()):
    fail(f"bars of one outcome in several (or no) colours: {fills}")
if len({next(iter(f)) for f in fills.values()}) != len(fills):
    fail(f"two outcomes share a colour: {fills}")

# Hover: the tooltip names the hovered attempt's record, number, duration and error.
probe = Collect()
probe.feed(open(probe_path, encoding="utf-8").read())
pre = [a for t, a in probe.elements if t == "pre" and a.get("id") == "probe"]
if not pre:
    fail("the hover probe did not run (no #probe in its DOM)")
if pre[0].get("data-error"):
    fail("the hover probe failed: " + pre[0]["data-error"])
tip_text = open(probe_path, encoding="utf-8").read()
tip_text = tip_text[tip_text.find('id="probe"'):]
tip_text = tip_text[tip_text.find(">") + 1:tip_text.find("</pre>")]
import html as _html
tip_text = _html.unescape(tip_text)
rec, att = pre[0]["data-record"], pre[0]["data-attempt"]
bar = next(b for b in data["bars"]
           if data["ids"][b[F["record"]]] == rec and str(b[F["attempt"]]) == att)
err = data["errors"][bar[F["error"]]] if bar[F["error"]] >= 0 else None
if pre[0].get("data-shown") != "block":
    fail(f"the tooltip is not shown on hover: display={pre[0].get('data-shown')!r}")
for want in [rec, f"attempt {att}", "took ", err]:
    if not want or want not in tip_text:
        fail(f"the tooltip lacks {want!r}: {tip_text!r}")
with open(png_path, "rb") as f:
    if f.read(8) != b"\x89PNG\r\n\x1a\n":
        fail("the screenshot is not a PNG")
print(f"e2e-timeline: {len(lanes)} lanes, {len(bars)} bars rendered "
      f"({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}); "
      f"{s['records']} records, {s['retries']} retries, {s['wall_seconds']:.2f} s")
print("e2e-timeline: hover tooltip: " + " | ".join(tip_text.split("\n")))
PY

if [ -n "$keep" ]; then
  cp "$tmp/timeline.png" "$keep"
  say "screenshot kept as $keep"
fi
say "PASS"
