#!/usr/bin/env python3
"""Checks of the deployment that a schema cannot make, for scripts/validate-deploy.sh.

  check_deploy.py schemas FILE...
      Every object in the manifests has a schema and passes it: the Kubernetes 1.33
      schemas of kubernetes-validate (strict), or, for the custom resources the chart
      renders (HTTPRoute, ScaledObject, ServiceMonitor), the JSON schemas under
      charts/tally/ci/crd-schemas/. An object with neither fails: nothing is skipped.

  check_deploy.py contract --default FILE --all-features FILE --all-features-values FILE
                           [--rebuild FILE --rebuild-values FILE]
                           [--postgres-store FILE --postgres-store-values FILE] [--infra FILE]
      The contract between the chart, the code and the rest of the repository: one
      Deployment per function; the routes of values.yaml == openapi.json == the
      cargo-lambda router of Cargo.toml; the HTTPRoute and the Ingress send every
      public endpoint to the right Service; pod hardening, probes, RBAC, hooks (the pods
      of the Deployments, the Jobs and the CronJobs: their jobTemplate's); the rebuild
      Job (all-features: with rebuild.stopProjector; --rebuild: a render with the
      rebuild's own defaults); the event store's settings (S3 by default;
      --postgres-store: a render with config.store postgres, no TALLY_S3_*); the
      chart's default backends are the Services of k8s/ (--infra: its kustomize build).

Both print one line per check and end with `checks: P passed, F failed`; the exit
status is 1 when a check failed. Run with the tools' Python (scripts/tools.sh env:
TALLY_TOOLS_PYTHON), which has PyYAML, jsonschema and kubernetes-validate.
"""

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "tally"
CRD_SCHEMAS = CHART / "ci" / "crd-schemas"
KUBERNETES_VERSION = "1.33.0"
# Crates under functions/ that the chart does not run as a Deployment: the local
# all-in-one gateway (the HTTPRoute/Ingress replace it), and the job and tool binaries.
NOT_DEPLOYMENTS = {"gateway", "migrate", "admin"}
# The consumer binaries that read a Kafka group other than TALLY_KAFKA_GROUP (the
# projector's): binary -> the variable naming its group.
CONSUMER_GROUP_VARIABLES = {"transfer-saga": "TALLY_SAGA_GROUP"}
SAMPLE_ID = "account123"
# The kinds that run pods of the image: each gets the pod checks (hardening, tokens, the
# settings and credentials it reads); pod_of finds their pod template.
POD_KINDS = ("Deployment", "Job", "CronJob")


class Checks:
    """Counts and prints the outcome of each check."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, description, problems):
        """problems: a list of strings (empty when the check holds) or a bool."""
        if problems is True:
            problems = []
        elif problems is False:
            problems = ["does not hold"]
        if problems:
            self.failed += 1
            print(f"  FAIL {description}")
            for problem in problems:
                print(f"       - {problem}")
        else:
            self.passed += 1
            print(f"  ok   {description}")

    def finish(self):
        print(f"checks: {self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


def load_docs(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------- schemas

def crd_schema_path(doc):
    """charts/tally/ci/crd-schemas/<kind>-<group>-<version>.json, e.g.
    httproute-gateway.networking.k8s.io-v1.json."""
    group_version = doc.get("apiVersion", "").replace("/", "-")
    return CRD_SCHEMAS / f"{doc.get('kind', '').lower()}-{group_version}.json"


def validate_schemas(files):
    checks = Checks()
    for path in files:
        by_kind = {}
        for doc in load_docs(path):
            problems = []
            schema_file = crd_schema_path(doc)
            if schema_file.exists():
                source = f"ci/crd-schemas/{schema_file.name}"
                validator = jsonschema.Draft7Validator(json.loads(schema_file.read_text()))
                for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                    problems.append(f"{name_of(doc)} at {where}: {error.message}")
            else:
                source = f"kubernetes-validate {KUBERNETES_VERSION} strict"
                try:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    problems.append(
                        f"{name_of(doc)}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in "
                        f"kubernetes-validate nor in {CRD_SCHEMAS.relative_to(ROOT)}/{schema_file.name}")
                except kubernetes_validate.ValidationError as error:  # a jsonschema.ValidationError
                    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                    problems.append(f"{name_of(doc)} at {where}: {error.message}")
            entry = by_kind.setdefault((doc.get("kind"), source), [0, []])
            entry[0] += 1
            entry[1].extend(problems)
        if not by_kind:
            checks.check(f"{path}: has objects", False)
        for (kind, source), (count, problems) in sorted(by_kind.items()):
            checks.check(f"{Path(path).name}: {count} {kind} against {source}", problems)
    return checks.finish()


# ---------------------------------------------------------------- contract

def merge(base, override):
    """Helm's merge of a values file over values.yaml: maps merge, the rest replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base.get(key), value) if key in base else value
        return merged
    return override


def sample_path(path):
    """/accounts/{id}/deposit -> /accounts/account123/deposit"""
    return re.sub(r"\{[^/}]+\}", SAMPLE_ID, path)


def values_routes(values):
    """{(METHOD, path): function} of the enabled http functions of values."""
    routes = {}
    for name, fn in values["functions"].items():
        if fn.get("enabled", True) and fn["kind"] == "http":
            for route in fn.get("routes") or []:
                routes[(route["method"], route["path"])] = name
    return routes


def pod_of(doc):
    """The pod template of a Deployment or a Job; of a CronJob, that of the Jobs it
    creates (spec.jobTemplate.spec.template)."""
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def selects(selector, labels):
    return all(labels.get(key) == value for key, value in selector.items())


def contract(args):
    checks = Checks()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values_all = merge(values, yaml.safe_load(Path(args.all_features_values).read_text()))
    default = load_docs(args.default)
    everything = load_docs(args.all_features)
    functions = values["functions"]
    enabled = {name: fn for name, fn in functions.items() if fn.get("enabled", True)}

    def objects(docs, kind):
        return [doc for doc in docs if doc["kind"] == kind]

    def component(doc):
        return doc["metadata"]["labels"].get("app.kubernetes.io/component")

    # --- one Deployment per function
    deployments = objects(default, "Deployment")
    by_function = {}
    for doc in deployments:
        by_function.setdefault(component(doc), []).append(doc["metadata"]["name"])
    wanted = sorted(name for name, fn in enabled.items() if fn["kind"] in ("http", "consumer"))
    checks.check(
        f"one Deployment per http/consumer function of values.yaml ({len(wanted)})",
        [f"{name}: {len(by_function.get(name, []))} Deployments" for name in wanted
         if len(by_function.get(name, [])) != 1]
        + [f"Deployment for {name}, which values.yaml does not run" for name in by_function if name not in wanted])

    crates = sorted(p.name for p in (ROOT / "functions").iterdir() if (p / "Cargo.toml").exists())
    commands = {}
    for doc in deployments:
        for container in pod_of(doc)["spec"]["containers"]:
            commands[doc["metadata"]["name"]] = container["command"][0]
    deployed_binaries = {command.rsplit("/", 1)[-1] for command in commands.values()}
    checks.check(
        "every crate in functions/ but " + ", ".join(sorted(NOT_DEPLOYMENTS)) + " has a Deployment running its binary",
        [f"functions/{crate}: no Deployment runs /usr/local/bin/{crate}"
         for crate in crates if crate not in NOT_DEPLOYMENTS and crate not in deployed_binaries])

    jobs = objects(default, "Job")
    # The hook Jobs, and the rebuild Job and the compaction CronJob of all-features.
    run_binaries = deployed_binaries | {
        c["command"][0].rsplit("/", 1)[-1]
        for job in jobs + objects(everything, "Job") + objects(everything, "CronJob")
        for c in pod_of(job)["spec"]["containers"]}
    checks.check("every binary the chart runs is a crate in functions/",
                 [f"/usr/local/bin/{b}: no functions/{b}" for b in sorted(run_binaries) if b not in crates])

    # --- the migration hooks
    hooks = {}
    for job in jobs:
        annotations = job["metadata"].get("annotations", {})
        container = pod_of(job)["spec"]["containers"][0]
        hooks[tuple(container.get("args", []))] = (
            annotations.get("helm.sh/hook"), int(annotations.get("helm.sh/hook-weight", "0")),
            container["command"][0], annotations.get("helm.sh/hook-delete-policy"))
    problems = []
    for step in (("storage",), ("schema",)):
        hook = hooks.get(step)
        if not hook:
            problems.append(f"no Job runs `migrate {step[0]}`")
            continue
        if hook[0] != "pre-install,pre-upgrade" or hook[2] != "/usr/local/bin/migrate":
            problems.append(f"`migrate {step[0]}`: hook {hook[0]}, command {hook[2]}")
        if set((hook[3] or "").split(",")) != {"before-hook-creation", "hook-succeeded"}:
            problems.append(f"`migrate {step[0]}`: hook-delete-policy {hook[3]}")
    if not problems and not hooks[("storage",)][1] < hooks[("schema",)][1]:
        problems.append("`migrate storage` does not run before `migrate schema` (hook weights)")
    hook_config = [doc for doc in default if doc["kind"] in ("ConfigMap", "Secret", "ServiceAccount")
                   and "helm.sh/hook" in doc["metadata"].get("annotations", {})]
    lowest_job = min((h[1] for h in hooks.values()), default=0)
    for doc in hook_config:
        if int(doc["metadata"]["annotations"].get("helm.sh/hook-weight", "0")) >= lowest_job:
            problems.append(f"{name_of(doc)} (what the hook Jobs read) is not created before them")
    for job in jobs:
        spec = pod_of(job)["spec"]
        names = {doc["metadata"]["name"] for doc in hook_config}
        refs = [ref.get("configMapRef", ref.get("secretRef", {})).get("name")
                for ref in spec["containers"][0].get("envFrom", [])] + [spec.get("serviceAccountName")]
        problems += [f"{name_of(job)} reads {ref}, which is not a hook created before it"
                     for ref in refs if ref not in names]
    checks.check("hook Jobs `migrate storage` then `migrate schema` (pre-install, pre-upgrade), "
                 "their config created first", problems)

    # --- one route table: values == openapi.json == Cargo.toml router
    routes = values_routes(values)
    openapi = json.loads((ROOT / "openapi.json").read_text())
    openapi_routes = {(method.upper(), path) for path, item in openapi["paths"].items()
                      for method in item if method in ("get", "put", "post", "delete", "patch", "head", "options")}
    checks.check(
        f"the routes of values.yaml ({len(routes)}) are the paths and methods of openapi.json",
        [f"{m} {p}: in values.yaml only" for m, p in sorted(set(routes) - openapi_routes)]
        + [f"{m} {p}: in openapi.json only" for m, p in sorted(openapi_routes - set(routes))])
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    router = cargo["workspace"]["metadata"]["lambda"]["watch"]["router"]
    cargo_routes = {(entry["method"], path): entry["function"] for path, entries in router.items()
                    for entry in entries}
    checks.check(
        "the routes of values.yaml, with their functions, are Cargo.toml's "
        "[workspace.metadata.lambda.watch.router]",
        [f"{m} {p} -> {routes.get((m, p))} in values.yaml, -> {cargo_routes.get((m, p))} in Cargo.toml"
         for m, p in sorted(set(routes) | set(cargo_routes)) if routes.get((m, p)) != cargo_routes.get((m, p))])

    # --- the gateway: HTTPRoute and Ingress (all-features render)
    services = {doc["metadata"]["name"]: doc for doc in objects(everything, "Service")}
    all_deployments = {component(doc): doc for doc in objects(everything, "Deployment")}
    all_routes = values_routes(values_all)

    def service_problems(function, backend_name, backend_port):
        """The backend is the Service of the function: it selects the function's pods on
        a port whose targetPort is a container port of theirs."""
        service = services.get(backend_name)
        deployment = all_deployments.get(function)
        if service is None or deployment is None:
            return [f"{function}: backend {backend_name} is not a rendered Service of a Deployment"]
        problems = []
        pod = pod_of(deployment)
        if not selects(service["spec"]["selector"], pod["metadata"]["labels"]) or any(
                selects(service["spec"]["selector"], pod_of(other)["metadata"]["labels"])
                for name, other in all_deployments.items() if name != function):
            problems.append(f"{function}: Service {backend_name} does not select exactly its pods")
        ports = [p for p in service["spec"]["ports"] if p["port"] == backend_port]
        container_ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        if not ports or ports[0]["targetPort"] not in container_ports:
            problems.append(f"{function}: Service {backend_name} has no port {backend_port} to a container port")
        return problems

    negative_samples = ["/", "/accounts/", f"/accounts/{SAMPLE_ID}/", f"/accounts/a/b/deposit",
                        f"/accounts/{SAMPLE_ID}/deposit/x", "/transfers/", f"/transfers/{SAMPLE_ID}/x",
                        "/projector/rebuild", "/relay/sweep", "/metrics"]

    http_routes = objects(everything, "HTTPRoute")
    problems = []
    if len(http_routes) != 1:
        problems.append(f"{len(http_routes)} HTTPRoutes rendered, want 1")
    else:
        rules = http_routes[0]["spec"]["rules"]

        def route_matches(match, method, path):
            if match.get("method", method) != method:
                return False
            kind, value = match["path"]["type"], match["path"]["value"]
            if kind == "Exact":
                return path == value
            if kind == "RegularExpression":
                return re.fullmatch(value, path) is not None
            return False  # PathPrefix: the chart does not use it; a prefix would swallow /accounts/{id}/...

        for (method, path), function in sorted(all_routes.items()):
            hits = [rule for rule in rules
                    if any(route_matches(m, method, sample_path(path)) for m in rule.get("matches", []))]
            if len(hits) != 1:
                problems.append(f"{method} {sample_path(path)}: matched by {len(hits)} rules, want 1")
                continue
            backends = hits[0].get("backendRefs", [])
            if len(backends) != 1:
                problems.append(f"{method} {path}: {len(backends)} backendRefs, want 1")
                continue
            problems += service_problems(function, backends[0]["name"], backends[0].get("port"))
        matches = sum(len(rule["matches"]) for rule in rules)
        if matches != len(all_routes):
            problems.append(f"{matches} matches for {len(all_routes)} routes")
        for method in ("GET", "POST"):
            for sample in negative_samples:
                hits = [r for r in rules if any(route_matches(m, method, sample) for m in r["matches"])]
                if hits:
                    problems.append(f"{method} {sample} is routed, but it is no public route")
    checks.check(f"the HTTPRoute sends each public route (method + path) to its function's Service, "
                 f"and nothing else", problems)

    ingresses = objects(everything, "Ingress")
    problems = []
    if len(ingresses) != 1:
        problems.append(f"{len(ingresses)} Ingresses rendered, want 1")
    else:
        ingress = ingresses[0]
        paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
        if ingress["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/use-regex") != "true":
            problems.append("no nginx.ingress.kubernetes.io/use-regex: \"true\"")
        problems += [f"{p['path']}: pathType {p['pathType']}, want ImplementationSpecific"
                     for p in paths if p["pathType"] != "ImplementationSpecific"]

        def nginx_matches(regex, path):
            # ingress-nginx with use-regex: location ~* "^<path>" (case-insensitive, from the start).
            return re.match("^" + regex, path, re.IGNORECASE) is not None

        for (method, path), function in sorted(all_routes.items()):
            hits = [p for p in paths if nginx_matches(p["path"], sample_path(path))]
            if len(hits) != 1:
                problems.append(f"{sample_path(path)}: matched by {len(hits)} Ingress paths, want 1")
                continue
            service = hits[0]["backend"]["service"]
            problems += service_problems(function, service["name"], service["port"].get("number"))
        for sample in negative_samples:
            if any(nginx_matches(p["path"], sample) for p in paths):
                problems.append(f"{sample} is routed, but it is no public route")
    checks.check("the Ingress sends each public path to its function's Service, and nothing else", problems)

    # --- settings: the environment the binaries read, pointing at k8s/ by default
    config = next(doc for doc in default if doc["kind"] == "ConfigMap" and "helm.sh/hook" not in
                  doc["metadata"].get("annotations", {}))
    secret = next(doc for doc in default if doc["kind"] == "Secret" and "helm.sh/hook" not in
                  doc["metadata"].get("annotations", {}))
    plain = {"HOST", "PORT", "RUST_LOG", "TALLY_STORE", "TALLY_S3_BUCKET", "TALLY_S3_ENDPOINT", "AWS_REGION",
             "TALLY_KAFKA_BROKERS", "TALLY_KAFKA_TOPIC", "TALLY_KAFKA_GROUP", "TALLY_SAGA_GROUP",
             "TALLY_CURRENCY", "TALLY_MAX_AMOUNT", "TALLY_SNAPSHOT_EVERY", "TALLY_TRANSFER_DEADLINE_SECONDS"}
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TALLY_DATABASE_URL", "TALLY_REDIS_URL"}
    checks.check(
        "the ConfigMap holds the plain settings, the Secret the credentials",
        [f"ConfigMap lacks {k}" for k in sorted(plain - set(config["data"]))]
        + [f"Secret lacks {k}" for k in sorted(credentials - set(secret.get("stringData", {})))]
        + [f"{k} is a credential in the ConfigMap" for k in sorted(credentials & set(config["data"]))])

    # --- the event store: S3 by default; PostgreSQL (--postgres-store) without the S3 settings
    def store_problems(docs, settings):
        """The ConfigMaps (the release's and the hooks' copy) and Secrets of docs, rendered
        with settings: TALLY_STORE is config.store, the TALLY_S3_* settings are there
        for s3 only, TALLY_EVENT_STORE_URL is secrets.eventStoreUrl when set (else absent)."""
        problems = []
        store = settings["config"]["store"]
        configs = [doc for doc in docs if doc["kind"] == "ConfigMap"]
        secrets = [doc for doc in docs if doc["kind"] == "Secret"]
        if not configs or not secrets:
            return [f"{len(configs)} ConfigMaps, {len(secrets)} Secrets"]
        for doc in configs:
            data = doc.get("data") or {}
            s3 = sorted(k for k in data if k.startswith("TALLY_S3_"))
            if data.get("TALLY_STORE") != store:
                problems.append(f"{name_of(doc)}: TALLY_STORE is {data.get('TALLY_STORE')!r}, want {store!r}")
            if store == "s3" and "TALLY_S3_BUCKET" not in data:
                problems.append(f"{name_of(doc)}: no TALLY_S3_BUCKET (store s3)")
            if store != "s3" and s3:
                problems.append(f"{name_of(doc)}: {', '.join(s3)} with store {store}")
        url = settings["secrets"].get("eventStoreUrl") or None
        for doc in secrets:
            data = doc.get("stringData") or {}
            if data.get("TALLY_EVENT_STORE_URL") != url:
                problems.append(f"{name_of(doc)}: TALLY_EVENT_STORE_URL is {data.get('TALLY_EVENT_STORE_URL')!r}, "
                                f"want {url!r}")
            if "TALLY_DATABASE_URL" not in data:
                problems.append(f"{name_of(doc)}: no TALLY_DATABASE_URL (the read model's)")
        return problems

    checks.check("the default event store is S3: TALLY_STORE=s3 and the TALLY_S3_* settings in both ConfigMaps, "
                 "no TALLY_EVENT_STORE_URL", store_problems(default, values))
    if args.postgres_store:
        what = Path(args.postgres_store_values).name
        settings = merge(values, yaml.safe_load(Path(args.postgres_store_values).read_text()))
        problems = store_problems(load_docs(args.postgres_store), settings)
        if settings["config"]["store"] != "postgres":
            problems.insert(0, f"{what} sets config.store {settings['config']['store']!r}, want postgres")
        url = ("its TALLY_EVENT_STORE_URL in both Secrets" if settings["secrets"].get("eventStoreUrl")
               else "no TALLY_EVENT_STORE_URL")
        checks.check(f"with config.store postgres ({what}): TALLY_STORE=postgres and no TALLY_S3_* in both "
                     f"ConfigMaps, {url}", problems)
    every_pod = [(doc, pod_of(doc)) for doc in default + everything if doc["kind"] in POD_KINDS]
    problems = []
    for docs in (default, everything):
        rendered = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
        for doc in docs:
            if doc["kind"] not in POD_KINDS:
                continue
            for container in pod_of(doc)["spec"]["containers"]:
                refs = sorted((kind, ref[key]["name"]) for ref in container.get("envFrom", [])
                              for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")) if key in ref)
                if [kind for kind, _ in refs] != ["ConfigMap", "Secret"] or not set(refs) <= rendered:
                    problems.append(f"{name_of(doc)}: envFrom {refs}, want a rendered ConfigMap and Secret")
    checks.check("every container reads the settings (ConfigMap) and the credentials (Secret) of the release",
                 problems)

    backends = {"minio": (config["data"].get("TALLY_S3_ENDPOINT"), r"^http://minio:9000$"),
                "kafka": (config["data"].get("TALLY_KAFKA_BROKERS"), r"^kafka:9092$"),
                "postgres": (secret["stringData"].get("TALLY_DATABASE_URL"), r"^postgres://[^@]+@postgres:5432/"),
                "redis": (secret["stringData"].get("TALLY_REDIS_URL"), r"^redis://redis:6379")}
    checks.check("the default backends are the in-namespace Services minio:9000, kafka:9092, postgres:5432, redis:6379",
                 [f"{name}: {value!r} does not match {pattern}" for name, (value, pattern) in backends.items()
                  if not re.match(pattern, value or "")])
    if args.infra:
        infra = load_docs(args.infra)
        infra_ports = {doc["metadata"]["name"]: {p["port"] for p in doc["spec"].get("ports", [])}
                       for doc in infra if doc["kind"] == "Service"}
        checks.check("k8s/ (kubectl kustomize) has those Services, so the chart's defaults reach it",
                     [f"k8s/ has no Service {name} with port {port}"
                      for name, port in (("minio", 9000), ("kafka", 9092), ("postgres", 5432), ("redis", 6379))
                      if port not in infra_ports.get(name, set())])
        infra_secrets = {}
        for doc in infra:
            if doc["kind"] == "Secret":
                infra_secrets.update(doc.get("stringData") or {})
        ours = secret["stringData"]
        database = re.match(r"^postgres(?:ql)?://([^:@/]+):([^@/]*)@[^/]+/([^?]+)", ours["TALLY_DATABASE_URL"])
        pairs = [("AWS_ACCESS_KEY_ID", ours["AWS_ACCESS_KEY_ID"], "MINIO_ROOT_USER"),
                 ("AWS_SECRET_ACCESS_KEY", ours["AWS_SECRET_ACCESS_KEY"], "MINIO_ROOT_PASSWORD")]
        if database:
            pairs += [("the database user", database[1], "POSTGRES_USER"),
                      ("the database password", database[2], "POSTGRES_PASSWORD"),
                      ("the database name", database[3], "POSTGRES_DB")]
        checks.check("the chart's default credentials are those of k8s/ (MinIO root user, PostgreSQL user and db)",
                     ([] if database else [f"TALLY_DATABASE_URL {ours['TALLY_DATABASE_URL']!r} is no postgres URL"])
                     + [f"{what} is {value!r}, k8s/ has {key}={infra_secrets.get(key)!r}"
                        for what, value, key in pairs if infra_secrets.get(key) != value])

    # --- pods: hardening, probes, service account tokens
    # The pods that talk to the API: leader election (the relay), and admin rebuild when
    # it stops the projector (rebuild.stopProjector).
    api_users = {name for name, fn in values_all["functions"].items()
                 if fn.get("leaderElection", {}).get("enabled")} \
        | ({"rebuild"} if values_all["rebuild"].get("stopProjector") else set())
    pod_context = {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    container_context = {**pod_context, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                         "capabilities": {"drop": ["ALL"]}}

    def differences(who, actual, wanted):
        return [f"{who}: {key} is {actual.get(key)}, want {value}"
                for key, value in wanted.items() if actual.get(key) != value]

    problems = []
    for doc, pod in every_pod:
        spec, who = pod["spec"], name_of(doc)
        problems += differences(f"{who} pod securityContext", spec.get("securityContext", {}), pod_context)
        api_user = component(doc) in api_users
        if spec.get("automountServiceAccountToken") is not api_user:
            problems.append(f"{who}: automountServiceAccountToken {spec.get('automountServiceAccountToken')}, "
                            f"want {api_user}")
        for container in spec["containers"]:
            problems += differences(f"{who} container {container['name']} securityContext",
                                    container.get("securityContext", {}), container_context)
            if doc["kind"] == "Deployment":
                probes = {kind: container.get(kind, {}).get("httpGet", {}).get("path")
                          for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
                if probes != {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}:
                    problems.append(f"{who}: probes {probes}")
        if doc["kind"] == "Deployment" and "checksum/config" not in pod["metadata"].get("annotations", {}):
            problems.append(f"{who}: no checksum/config annotation")
    problems = sorted(set(problems), key=problems.index)  # the default and all-features renders repeat
    kinds = ", ".join(f"{sum(doc['kind'] == kind for doc, _ in every_pod)} {kind}" for kind in POD_KINDS)
    checks.check(f"{len(every_pod)} pods ({kinds}): non-root 65532, read-only root, no privilege escalation, no capability, "
                 f"RuntimeDefault seccomp; a token only for {', '.join(sorted(api_users))}; probes /healthz, /readyz", problems)

    # --- the relay: leader election through a Lease, with RBAC
    problems = []
    relay = all_deployments.get("relay")
    if relay is None:
        problems.append("no relay Deployment")
    else:
        pod = pod_of(relay)["spec"]
        env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
        lease = env.get("TALLY_LEASE_NAME", {}).get("value")
        if not lease:
            problems.append("relay: no TALLY_LEASE_NAME")
        for variable, field in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
            if env.get(variable, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != field:
                problems.append(f"relay: {variable} is not the downward API's {field}")
        account = pod.get("serviceAccountName")
        granted = set()
        for binding in objects(everything, "RoleBinding"):
            if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
                role = next(r for r in objects(everything, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"])
                for rule in role["rules"]:
                    if "coordination.k8s.io" in rule["apiGroups"] and "leases" in rule["resources"]:
                        names = rule.get("resourceNames")
                        granted |= {verb for verb in rule["verbs"] if not names or lease in names}
        if not {"get", "create", "update"} <= granted:
            problems.append(f"relay ({account}): may {sorted(granted)} its Lease {lease}, needs get, create, update")
    checks.check("the relay elects a leader through its Lease (env, downward API, Role)", problems)

    # --- the rebuild Job: all-features, and --rebuild when given
    def rebuild_problems(docs, settings):
        """The rebuild Job of docs, rendered with settings (values merged over values.yaml)."""
        problems = []
        rebuild = [job for job in objects(docs, "Job") if component(job) == "rebuild"]
        if len(rebuild) != 1:
            return [f"{len(rebuild)} rebuild Jobs, want 1"]
        pod = pod_of(rebuild[0])["spec"]
        container = pod["containers"][0]
        argv = container["command"] + container.get("args", [])
        account = pod["serviceAccountName"]
        binding = next((b for b in objects(docs, "RoleBinding")
                        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])), None)
        stop = bool(settings["rebuild"].get("stopProjector"))
        if pod.get("automountServiceAccountToken") is not stop:
            problems.append(f"rebuild: automountServiceAccountToken {pod.get('automountServiceAccountToken')}, "
                            f"want {stop} (stopProjector {stop})")
        if not stop:
            # The projector keeps running: a plain replay, no API access.
            if argv != ["/usr/local/bin/admin", "rebuild"]:
                problems.append(f"rebuild runs {argv}, want `admin rebuild` (stopProjector false)")
            if binding is not None:
                problems.append(f"rebuild ({account}) is bound to Role {binding['roleRef']['name']} (stopProjector false)")
            return problems
        projector = {component(d): d for d in objects(docs, "Deployment")}.get(settings["rebuild"]["projector"])
        if argv[:3] != ["/usr/local/bin/admin", "rebuild", "--projector"] or projector is None \
                or argv[3] != projector["metadata"]["name"]:
            problems.append(f"rebuild runs {argv}")
        role = binding and next(r for r in objects(docs, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"])
        allowed = {(group, resource, verb) for rule in (role or {}).get("rules", []) for group in rule["apiGroups"]
                   for resource in rule["resources"] for verb in rule["verbs"]}
        needed = {("apps", "deployments", v) for v in ("get", "list", "patch")} \
            | {("apps", "deployments/scale", v) for v in ("get", "patch", "update")} | {("", "pods", "list")}
        projector_name = projector["metadata"]["name"] if projector else None
        if projector_name in {doc["metadata"]["name"] for doc in objects(docs, "ScaledObject")}:
            if argv[-2:] != ["--scaled-object", projector_name]:
                problems.append(f"the projector has a ScaledObject, and rebuild runs {argv} (no --scaled-object)")
            needed |= {("keda.sh", "scaledobjects", v) for v in ("get", "patch")}
        problems += [f"rebuild may not {verb} {group}/{resource}" for group, resource, verb in sorted(needed - allowed)]
        return problems

    def rebuild_check(what, docs, settings):
        if settings["rebuild"].get("stopProjector"):
            description = ("the rebuild Job runs `admin rebuild --projector <projector>` (and pauses its "
                           "ScaledObject) with a token and its RBAC")
        else:
            description = "the rebuild Job runs a plain `admin rebuild`: no token, no Role, the projector keeps running"
        checks.check(f"{description} ({what})", rebuild_problems(docs, settings))

    rebuild_check("all-features", everything, values_all)
    if args.rebuild:
        rebuild_check(Path(args.rebuild_values).name, load_docs(args.rebuild),
                      merge(values, yaml.safe_load(Path(args.rebuild_values).read_text())))

    # --- autoscaling and disruption budgets (all-features)
    problems = []
    config_all = next(doc for doc in everything if doc["kind"] == "ConfigMap" and "helm.sh/hook" not in
                      doc["metadata"].get("annotations", {}))["data"]
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in objects(everything, "ScaledObject")}
    hpas = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in objects(everything, "HorizontalPodAutoscaler")}
    binaries = {doc["metadata"]["name"]: pod_of(doc)["spec"]["containers"][0]["command"][0].rsplit("/", 1)[-1]
                for doc in objects(everything, "Deployment")}
    for name, doc in scaled.items():
        trigger = doc["spec"]["triggers"][0]
        # The group the consumer's binary reads: the saga's own, else the projector's.
        group = config_all[CONSUMER_GROUP_VARIABLES.get(binaries.get(name), "TALLY_KAFKA_GROUP")]
        want = {"bootstrapServers": config_all["TALLY_KAFKA_BROKERS"], "consumerGroup": group,
                "topic": config_all["TALLY_KAFKA_TOPIC"]}
        if trigger["type"] != "kafka" or any(trigger["metadata"].get(k) != v for k, v in want.items()):
            problems.append(f"ScaledObject {name}: trigger {trigger}, want kafka on {want}")
    if not scaled:
        problems.append("no ScaledObject")
    if config_all["TALLY_KAFKA_GROUP"] == config_all["TALLY_SAGA_GROUP"]:
        problems.append(f"TALLY_KAFKA_GROUP and TALLY_SAGA_GROUP are both {config_all['TALLY_SAGA_GROUP']!r}")
    for doc in objects(everything, "Deployment"):
        name = doc["metadata"]["name"]
        if (name in scaled or name in hpas) and "replicas" in doc["spec"]:
            problems.append(f"{name}: autoscaled, yet sets replicas")
        if name in scaled and name in hpas:
            problems.append(f"{name}: both an HPA and a ScaledObject")
        least = (scaled[name]["spec"]["minReplicaCount"] if name in scaled
                 else hpas[name]["spec"]["minReplicas"] if name in hpas else doc["spec"]["replicas"])
        budgets = [p for p in objects(everything, "PodDisruptionBudget")
                   if selects(p["spec"]["selector"]["matchLabels"], pod_of(doc)["metadata"]["labels"])]
        explicit = values_all["functions"][component(doc)].get("pdb", {}).get("enabled")
        want = least > 1 if explicit is None else explicit
        if len(budgets) != (1 if want else 0):
            problems.append(f"{name}: {len(budgets)} PodDisruptionBudgets at {least} replicas (pdb.enabled {explicit})")
    checks.check("autoscalers (HPA, KEDA on each consumer's own group) own replicas; a PDB where more than one replica runs",
                 problems)

    monitors = objects(everything, "ServiceMonitor")
    problems = []
    if len(monitors) != 1:
        problems.append(f"{len(monitors)} ServiceMonitors, want 1")
    else:
        spec = monitors[0]["spec"]
        if [(e.get("port"), e.get("path")) for e in spec["endpoints"]] != [("http", "/metrics")]:
            problems.append(f"endpoints {spec['endpoints']}")
        for name, service in services.items():
            if not selects(spec["selector"]["matchLabels"], service["metadata"]["labels"]):
                problems.append(f"Service {name} is not scraped")
            if "http" not in {p.get("name") for p in service["spec"]["ports"]}:
                problems.append(f"Service {name} has no port named http")
    checks.check(f"the ServiceMonitor scrapes /metrics on the http port of every Service ({len(services)})", problems)

    return checks.finish()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    schemas = commands.add_parser("schemas")
    schemas.add_argument("files", nargs="+")
    contract_parser = commands.add_parser("contract")
    contract_parser.add_argument("--default", required=True, help="helm template with the default values")
    contract_parser.add_argument("--all-features", required=True, help="helm template with ci/all-features-values.yaml")
    contract_parser.add_argument("--all-features-values", required=True, help="the values file of --all-features")
    contract_parser.add_argument("--rebuild", help="helm template with a values file that enables the rebuild")
    contract_parser.add_argument("--rebuild-values", help="the values file of --rebuild")
    contract_parser.add_argument("--postgres-store", help="helm template with config.store postgres")
    contract_parser.add_argument("--postgres-store-values", help="the values file of --postgres-store")
    contract_parser.add_argument("--infra", help="kubectl kustomize k8s/")
    args = parser.parse_args()
    if args.command == "contract" and bool(args.rebuild) != bool(args.rebuild_values):
        parser.error("--rebuild and --rebuild-values go together")
    if args.command == "contract" and bool(args.postgres_store) != bool(args.postgres_store_values):
        parser.error("--postgres-store and --postgres-store-values go together")
    if args.command == "schemas":
        return validate_schemas(args.files)
    try:
        return contract(args)
    except (KeyError, IndexError, TypeError, StopIteration, AttributeError) as error:
        # A render too broken to read (the schema checks say why): one failure, not a traceback.
        print(f"  FAIL the contract checks could not read the manifests: {type(error).__name__} {error}")
        print("checks: 0 passed, 1 failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
