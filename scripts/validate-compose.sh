#!/usr/bin/env bash
# Validate docker-compose.yml offline: against the Compose Specification JSON schema
# and against the project's rules, then prove the checks can fail by running them on
# deliberately broken copies.
#
#   scripts/validate-compose.sh              docker-compose.yml + the self-tests
#   scripts/validate-compose.sh FILE         FILE only (exit 1 when it is invalid)
#
# The schema is the one PyPI's check-jsonschema vendors (the Compose Specification,
# check_jsonschema/builtin_schemas/vendor/compose-spec.json, kept in sync with
# compose-spec/compose-spec upstream); the validator is Python's jsonschema (draft
# 2020-12). Both are installed, pinned, once, in a virtualenv under
# ${TALLY_CACHE:-~/.cache/tally}/tools; later runs reuse it and need no network.
#
# The project's rules:
#   pinned     every image has a tag (not latest) or a digest
#   profiles   the project's image (tally:*) runs only behind the `functions` profile;
#              the backends have no profile, so `docker compose up` starts them alone
#   functions  every function binary (functions/*, but gateway, migrate, admin) has its
#              own service running /usr/local/bin/<name>, waiting for `init`
#   health     every service another depends on has a healthcheck (a one-shot job
#              waited for with service_completed_successfully excepted)
#   oneshot    every one-shot service (restart "no") is waited for by a long-running
#              one with service_completed_successfully (so `up --wait` exits 0)
#   depends    depends_on names existing services, and no service without a profile
#              depends on one behind a profile
#   ports      published ports bind 127.0.0.1
#   gateway    the gateway's TALLY_UPSTREAMS routes every public function (the
#              cargo-lambda router in Cargo.toml) to http://<function>:8080
#   auth       every function service requires bearer tokens of one issuer
#              (TALLY_AUTH_ISSUER, the same everywhere) that a service of the file
#              serves, with a healthcheck, which every function waits for
#              (service_healthy); every function has the same TALLY_STREAM_KEY,
#              base64 of at least 32 bytes; and every function has the same
#              TALLY_MASTER_KEY, base64 (standard, padded) of exactly 32 bytes
#
# Last line: `compose: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${TALLY_CACHE:-$HOME/.cache/tally}/tools
VENV=$TOOLS/compose-validate
# Pinned: the schema travels with check-jsonschema's version.
REQUIREMENTS=(check-jsonschema==0.39.0 jsonschema==4.26.0 ruamel.yaml==0.19.1)

log() { echo "validate-compose: $*" >&2; }

install_tools() {
  local stamp=$VENV/.tally-requirements want
  want="${REQUIREMENTS[*]}"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return; fi
  command -v python3 >/dev/null || { log "python3 not found (Debian: apt-get install python3 python3-venv)"; exit 1; }
  log "installing ${REQUIREMENTS[*]} into $VENV"
  rm -rf "$VENV"
  mkdir -p "$TOOLS"
  python3 -m venv "$VENV" || { log "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 1; }
  "$VENV/bin/pip" install -q --disable-pip-version-check "${REQUIREMENTS[@]}"
  echo "$want" >"$stamp"
}

install_tools
PY=$VENV/bin/python

if [ $# -gt 1 ]; then echo "usage: $0 [FILE]" >&2; exit 2; fi
if [ $# -eq 1 ]; then
  MODE=file FILE=$1
else
  MODE=full FILE=docker-compose.yml
fi
[ -f "$FILE" ] || { log "$FILE: no such file"; exit 2; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

set +e
"$PY" - "$MODE" "$FILE" "$WORK" <<'PY'
import base64
import binascii
import copy
import io
import json
import os
import re
import sys
import tomllib
from importlib.resources import files
from pathlib import Path

import jsonschema
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

MODE, FILE, WORK = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
SCHEMA_RESOURCE = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
PROJECT_IMAGE = re.compile(r"^tally(:|@|$)")
PROFILE = "functions"
NOT_SERVICES = {"gateway", "migrate", "admin"}  # the proxy, the init job, the operator CLI
PORT = re.compile(r"^(?:(?P<ip>\[[0-9a-fA-F:.]+\]|\d+\.\d+\.\d+\.\d+):)?(?:(?P<host>\d+(?:-\d+)?):)?(?P<container>\d+(?:-\d+)?)(?:/(?:tcp|udp|sctp))?$")


def load_yaml(text):
    yaml = YAML(typ="safe", pure=True)  # YAML 1.2, merge keys (<<), duplicate keys rejected
    return yaml.load(text)


def interpolate(value, env):
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, $VAR, $$), applied to every string before validation."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        missing = current is None or (op in (":-", ":?") and current == "")
        if op in (":-", "-"):
            return arg if missing else current
        if op in (":?", "?") and missing:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return current or ""

    pattern = r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    return re.sub(pattern, sub, value)


def schema_errors(doc, schema):
    validator = jsonschema.Draft202012Validator(schema)
    found = []
    for error in validator.iter_errors(doc):
        best = jsonschema.exceptions.best_match([error]) or error
        found.append((tuple(map(str, best.absolute_path)), best.message))
    out = []
    for path, message in sorted(set(found)):
        # A property whose own value is invalid also counts as "unevaluated" for its
        # parent (draft 2020-12): say only the real error.
        if message.startswith("Unevaluated properties") and any(
            len(p) > len(path) and p[: len(path)] == path for p, _ in found
        ):
            continue
        if "does not match any of the regexes: '^x-'" in message:
            message = f"unknown key {message.split(' does not match')[0]} (extensions must start with x-)"
        out.append(f"{'/'.join(path) or '(top level)'}: {message}")
    return out


def image_problem(image):
    if not isinstance(image, str) or not image:
        return "has no image"
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if digest:
        return None if re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else f"image {image!r}: bad digest"
    if not tag:
        return f"image {image!r} is not pinned (no tag)"
    if tag == "latest":
        return f"image {image!r} is not pinned (:latest)"
    return None


def deps(service):
    """depends_on as {name: condition} (the short list syntax means service_started)."""
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def env_of(service):
    value = service.get("environment") or {}
    if isinstance(value, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in value)
    return value


def binary_of(service):
    command = service.get("command")
    if isinstance(command, str):
        command = command.split()
    if not command:
        return None
    return command[0].rsplit("/", 1)[-1]


def repo_functions():
    """(every function binary that runs as a service, the public ones)."""
    names = set()
    for manifest in Path("functions").glob("*/Cargo.toml"):
        data = tomllib.loads(manifest.read_text())
        bins = [b["name"] for b in data.get("bin", [])] or [data["package"]["name"]]
        names.update(bins)
    cargo = tomllib.loads(Path("Cargo.toml").read_text())
    router = cargo.get("workspace", {}).get("metadata", {}).get("lambda", {}).get("watch", {}).get("router", {})
    public = {entry["function"] for entries in router.values() for entry in entries}
    return names - NOT_SERVICES, public


def rule_checks(doc):
    """{rule: [problems]} for the project's rules."""
    services = doc.get("services") or {}
    problems = {r: [] for r in ("pinned", "profiles", "functions", "health", "oneshot", "depends", "ports", "gateway", "auth")}
    project = {n for n, s in services.items() if "build" in s or PROJECT_IMAGE.match(str(s.get("image", "")))}

    for name, s in services.items():
        if "image" in s or "build" not in s:
            p = image_problem(s.get("image"))
            if p:
                problems["pinned"].append(f"{name}: {p}")
        profiles = s.get("profiles") or []
        if name in project and PROFILE not in profiles:
            problems["profiles"].append(f"{name}: runs the project's image but is not behind the '{PROFILE}' profile")
        if name not in project and profiles:
            problems["profiles"].append(f"{name}: a backend behind profiles {profiles}; `docker compose up` would not start it")

    wanted, public = repo_functions()
    inits = [n for n, s in services.items() if binary_of(s) == "migrate"]
    if not inits:
        problems["functions"].append("no init service runs /usr/local/bin/migrate")
    for function in sorted(wanted):
        s = services.get(function)
        if s is None:
            problems["functions"].append(f"{function}: no service (functions/{function} has a binary)")
            continue
        if binary_of(s) != function:
            problems["functions"].append(f"{function}: runs {binary_of(s)!r}, not /usr/local/bin/{function}")
        waits = any(deps(s).get(i) == "service_completed_successfully" for i in inits)
        if inits and not waits:
            problems["functions"].append(f"{function}: does not wait for {inits[0]} (condition: service_completed_successfully)")

    for name, s in services.items():
        for target, condition in deps(s).items():
            t = services.get(target)
            if t is None:
                problems["depends"].append(f"{name}: depends on {target}, which is not a service")
                continue
            if not (s.get("profiles") or []) and (t.get("profiles") or []):
                problems["depends"].append(f"{name}: has no profile but depends on {target}, which is behind {t['profiles']}")
            if condition == "service_completed_successfully":
                continue
            hc = t.get("healthcheck") or {}
            if not hc.get("test") or hc.get("disable") or hc.get("test") == ["NONE"]:
                problems["health"].append(f"{target}: {name} depends on it ({condition}) but it has no healthcheck")

    for name, s in services.items():
        if s.get("restart") == "no":
            adopters = [o for o, os_ in services.items() if deps(os_).get(name) == "service_completed_successfully" and os_.get("restart") != "no"]
            if not adopters:
                problems["oneshot"].append(f"{name}: one-shot (restart \"no\") but no long-running service waits for it with service_completed_successfully")

    for name, s in services.items():
        ports = s.get("ports") or []
        for port in ports if isinstance(ports, list) else []:
            if isinstance(port, dict):
                if port.get("published") is not None and port.get("host_ip") != "127.0.0.1":
                    problems["ports"].append(f"{name}: port {port} does not bind host_ip 127.0.0.1")
                continue
            m = PORT.match(str(port))
            if not m:
                problems["ports"].append(f"{name}: port {port!r} is not HOST_IP:HOST:CONTAINER")
            elif m.group("host") and m.group("ip") != "127.0.0.1":
                problems["ports"].append(f"{name}: port {port!r} publishes on {m.group('ip') or 'every interface'}, not 127.0.0.1")

    gateway = services.get("gateway")
    if gateway is None:
        problems["gateway"].append("no gateway service")
    else:
        raw = str(env_of(gateway).get("TALLY_UPSTREAMS") or "")
        pairs = dict(p.split("=", 1) for p in raw.replace("\n", "").split(",") if "=" in p)
        if set(pairs) != public:
            problems["gateway"].append(f"TALLY_UPSTREAMS names {sorted(pairs)}, the public functions are {sorted(public)}")
        for function, url in sorted(pairs.items()):
            if url != f"http://{function}:8080":
                problems["gateway"].append(f"TALLY_UPSTREAMS: {function}={url}, expected http://{function}:8080")
            if function not in services:
                problems["gateway"].append(f"TALLY_UPSTREAMS: {function} is not a service")

    problems["auth"] = auth_problems(services, [f for f in sorted(wanted) if f in services])
    return problems


def key_length(text):
    """The bytes of a base64 key (standard or URL-safe alphabet, as the binaries
    read TALLY_STREAM_KEY), or None when it is not base64."""
    text = text.strip()
    try:
        return len(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        pass
    try:
        return len(base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True))
    except (binascii.Error, ValueError):
        return None


def master_key_length(text):
    """The bytes of a master key (standard alphabet, padded, as the binaries read
    TALLY_MASTER_KEY), or None when it is not such base64."""
    try:
        return len(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return None


def auth_problems(services, functions):
    """Authentication on in every function, with one issuer that a healthy service of
    the file serves; one stream key and one master key everywhere."""
    problems = []
    issuers, keys, masters = {}, {}, {}
    for function in functions:
        env = env_of(services[function])
        issuer, key = str(env.get("TALLY_AUTH_ISSUER") or ""), str(env.get("TALLY_STREAM_KEY") or "")
        master = str(env.get("TALLY_MASTER_KEY") or "")
        if not master:
            problems.append(f"{function}: no TALLY_MASTER_KEY (holders' data keys cannot be wrapped)")
        else:
            masters.setdefault(master, []).append(function)
            length = master_key_length(master)
            if length != 32:
                problems.append(f"{function}: TALLY_MASTER_KEY is {'not base64' if length is None else f'{length} bytes'}, "
                                "want base64 of exactly 32")
        if not issuer:
            problems.append(f"{function}: no TALLY_AUTH_ISSUER (authentication off)")
        else:
            issuers.setdefault(issuer, []).append(function)
        if not key:
            problems.append(f"{function}: no TALLY_STREAM_KEY (the commit topic unsigned)")
        else:
            keys.setdefault(key, []).append(function)
            length = key_length(key)
            if length is None or length < 32:
                problems.append(f"{function}: TALLY_STREAM_KEY is {'not base64' if length is None else f'{length} bytes'}, "
                                "want base64 of at least 32")
    if len(issuers) > 1:
        problems.append("the functions name different issuers: " + "; ".join(f"{i} ({', '.join(f)})" for i, f in issuers.items()))
    if len(keys) > 1:
        problems.append(f"the functions hold {len(keys)} different TALLY_STREAM_KEYs; every function needs the same one")
    if len(masters) > 1:
        problems.append(f"the functions hold {len(masters)} different TALLY_MASTER_KEYs; every function needs the same one")
    for issuer in issuers:
        m = re.match(r"^https?://([^/:]+)(?::\d+)?(/.*)?$", issuer)
        provider = m and m.group(1)
        if provider not in services:
            problems.append(f"TALLY_AUTH_ISSUER {issuer}: {provider or 'its host'} is not a service of the file")
            continue
        hc = services[provider].get("healthcheck") or {}
        if not hc.get("test") or hc.get("disable") or hc.get("test") == ["NONE"]:
            problems.append(f"{provider} (the issuer) has no healthcheck")
        problems += [f"{function}: does not wait for {provider} (the issuer; condition: service_healthy)"
                     for function in issuers[issuer] if deps(services[function]).get(provider) != "service_healthy"]
    return problems


def validate_text(text, schema):
    """[(check, [problems])] for a compose file's text."""
    try:
        doc = load_yaml(text)
    except YAMLError as e:
        message = " ".join(str(e).split("To suppress this check")[0].split())
        return [("yaml", [f"not valid YAML: {message}"])]
    if not isinstance(doc, dict):
        return [("yaml", ["the top level is not a mapping"])]
    try:
        doc = interpolate(doc, dict(os.environ))
    except ValueError as e:
        return [("yaml", [str(e)])]
    results = [("yaml", []), ("schema", schema_errors(doc, schema))]
    try:
        results += list(rule_checks(doc).items())
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if not results[1][1]:
            raise
        results.append(("rules", [f"not checked, the file does not match the schema ({type(e).__name__}: {e})"]))
    return results


def report(results, label):
    failed = [(c, p) for c, p in results if p]
    for check, probs in results:
        if probs:
            for p in probs:
                print(f"FAIL {label} [{check}] {p}")
    return failed


DESCRIPTIONS = {
    "yaml": "parses as YAML (merge keys resolved, no duplicate keys)",
    "schema": "matches the Compose Specification schema",
    "pinned": "every image is pinned (a tag other than latest, or a digest)",
    "profiles": "the project's image runs only behind the 'functions' profile",
    "functions": "every function has its own service and waits for init",
    "health": "every service depended on has a healthcheck",
    "oneshot": "one-shot services are waited for (up --wait exits 0)",
    "depends": "depends_on names services, none across profiles",
    "ports": "published ports bind 127.0.0.1",
    "gateway": "the gateway proxies every public function",
    "auth": "every function requires tokens of one healthy issuer and shares one stream key and one master key",
    "rules": "the project's rules",
}


def main():
    schema = json.loads(SCHEMA_RESOURCE.read_text())
    text = FILE.read_text()
    passed = failed = 0
    results = validate_text(text, schema)
    bad = report(results, str(FILE))
    for check, probs in results:
        if not probs:
            print(f"ok   {FILE} [{check}] {DESCRIPTIONS[check]}")
    if MODE == "file":
        print(f"{FILE}: {'invalid' if bad else 'valid'}")
        return 1 if bad else 0
    passed += sum(1 for _, p in results if not p)
    failed += sum(1 for _, p in results if p)

    # Self-tests: each broken copy must fail, and in the check it breaks.
    base = load_yaml(text)

    def mutate(fn):
        doc = copy.deepcopy(base)
        fn(doc)
        return doc

    def dump(doc):
        out = io.StringIO()
        y = YAML(typ="safe", pure=True)
        y.default_flow_style = False
        y.dump(doc, out)
        return out.getvalue()

    some_backend = next(n for n, s in base["services"].items() if "build" not in s and not PROJECT_IMAGE.match(str(s.get("image", ""))))
    a_function = next(n for n, s in base["services"].items() if PROJECT_IMAGE.match(str(s.get("image", ""))) and binary_of(s) not in NOT_SERVICES)
    a_healthchecked = next(n for n, s in base["services"].items() if s.get("healthcheck"))

    def set_(path, value):
        def fn(doc):
            node = doc
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        return fn

    def delete(path):
        def fn(doc):
            node = doc
            for key in path[:-1]:
                node = node[key]
            del node[path[-1]]
        return fn

    def drop_upstream(doc):
        env = doc["services"]["gateway"]["environment"]
        env["TALLY_UPSTREAMS"] = ",".join(p for p in str(env["TALLY_UPSTREAMS"]).split(",") if not p.startswith(a_function + "="))

    def set_env(names, **changes):
        """Give services their own environment (the anchor's is shared), changed:
        a value of None removes the variable."""
        def fn(doc):
            for name in names:
                env = dict(env_of(doc["services"][name]))
                for key, value in changes.items():
                    if value is None:
                        env.pop(key, None)
                    else:
                        env[key] = value
                doc["services"][name]["environment"] = env
        return fn

    every_function = [n for n, s in base["services"].items()
                      if PROJECT_IMAGE.match(str(s.get("image", ""))) and binary_of(s) not in NOT_SERVICES | {"migrate"}]
    issuer_service = re.sub(r"^https?://([^/:]+).*$", r"\1", str(env_of(base["services"][a_function]).get("TALLY_AUTH_ISSUER") or ""))

    cases = [
        ("ports: \"abc\" (a string, not a list)", "schema", dump(mutate(set_(["services", some_backend, "ports"], "abc")))),
        ("an unknown top-level key", "schema", dump(mutate(set_(["servicez"], {})))),
        ("an unknown service key", "schema", dump(mutate(set_(["services", some_backend, "imagee"], "x")))),
        ("a healthcheck interval that is a number", "schema", dump(mutate(set_(["services", a_healthchecked, "healthcheck", "interval"], 5)))),
        ("an image on :latest", "pinned", dump(mutate(set_(["services", some_backend, "image"], "redis:latest")))),
        ("an untagged image", "pinned", dump(mutate(set_(["services", some_backend, "image"], "postgres")))),
        (f"{a_function} without the functions profile", "profiles", dump(mutate(delete(["services", a_function, "profiles"])))),
        (f"{a_healthchecked} without a healthcheck", "health", dump(mutate(delete(["services", a_healthchecked, "healthcheck"])))),
        ("a port published on every interface", "ports", dump(mutate(set_(["services", some_backend, "ports"], ["8088:8088"])))),
        (f"the gateway without {a_function}", "gateway", dump(mutate(drop_upstream))),
        (f"no {a_function} service", "functions", dump(mutate(delete(["services", a_function])))),
        (f"{a_function} without TALLY_AUTH_ISSUER", "auth", dump(mutate(set_env([a_function], TALLY_AUTH_ISSUER=None)))),
        (f"{a_function} without TALLY_STREAM_KEY", "auth", dump(mutate(set_env([a_function], TALLY_STREAM_KEY=None)))),
        (f"{a_function} with a stream key of its own", "auth",
         dump(mutate(set_env([a_function], TALLY_STREAM_KEY="b3duLWtleS1vZi1pdHMtb3duLWZvci10aGUtdGVzdHMh")))),
        ("a stream key of 16 bytes everywhere", "auth",
         dump(mutate(set_env(every_function, TALLY_STREAM_KEY="c2l4dGVlbi1ieXRlcy1rZXk=")))),
        (f"{a_function} without TALLY_MASTER_KEY", "auth", dump(mutate(set_env([a_function], TALLY_MASTER_KEY=None)))),
        (f"{a_function} with a master key of its own", "auth",
         dump(mutate(set_env([a_function], TALLY_MASTER_KEY="b3duLW1hc3Rlci1rZXktb2YtaXRzLW93bi10ZXN0cyE=")))),
        ("a master key of 33 bytes everywhere", "auth",
         dump(mutate(set_env(every_function, TALLY_MASTER_KEY="dGhpcnR5LXRocmVlLWJ5dGVzLW9mLWEtbWFzdGVya2V5")))),
        ("an issuer that no service serves", "auth",
         dump(mutate(set_env(every_function, TALLY_AUTH_ISSUER="http://nowhere:9400")))),
        (f"{issuer_service or 'the issuer'} without a healthcheck", "auth",
         dump(mutate(delete(["services", issuer_service, "healthcheck"])) if issuer_service in base["services"] else text)),
        ("broken YAML", "yaml", text + "\n  - [unclosed\n"),
    ]
    for label, expect, broken in cases:
        path = Path(WORK) / f"broken-{len(label)}-{expect}.yml"
        path.write_text(broken)
        got = [c for c, p in validate_text(broken, schema) if p]
        if expect in got:
            passed += 1
            print(f"ok   self-test: {label} is rejected [{expect}]")
        else:
            failed += 1
            print(f"FAIL self-test: {label} was not rejected by [{expect}] (failed: {got or 'nothing'})")
    (Path(WORK) / "counts").write_text(f"{passed} {failed}\n")
    return 1 if failed else 0


sys.exit(main())
PY
status=$?
set -e

if [ "$MODE" = file ]; then exit "$status"; fi

read -r passed failed <"$WORK/counts" || { log "the validator did not finish"; exit 1; }

# The command itself exits non-zero on a broken file (what CI relies on).
broken=$WORK/broken-cli.yml
sed 's/^services:$/servicez: {}\nservices:/' "$FILE" >"$broken"
if "$0" "$broken" >"$WORK/cli.log" 2>&1; then
  echo "FAIL self-test: $0 FILE exited 0 on a file with an unknown top-level key"
  failed=$((failed + 1))
else
  echo "ok   self-test: $0 FILE exits non-zero on a broken file"
  passed=$((passed + 1))
fi

echo "compose: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$status" -eq 0 ]
