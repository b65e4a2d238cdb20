{{/*
Helpers of the tally chart.

Most helpers that concern one function take a dict:
  root  the top-level context ($)
  name  the function's key in .Values.functions (e.g. "deposit")
  fn    the function's values
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "tally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name: fullnameOverride, else the release name when it already
contains the chart name ("tally" -> "tally"), else "<release>-tally". Every object is
"<fullname>" or "<fullname>-<function>".
*/}}
{{- define "tally.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The name of a function's objects (Deployment, Service, HPA, ...): dict root, name. */}}
{{- define "tally.componentName" -}}
{{- printf "%s-%s" (include "tally.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels of every object of the release (root context). */}}
{{- define "tally.labels" -}}
helm.sh/chart: {{ include "tally.chart" . }}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tally
{{- end }}

{{/* The labels of a function's objects: dict root, name. */}}
{{- define "tally.componentLabels" -}}
{{ include "tally.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* The selector of a function's pods (never changes across upgrades): dict root, name. */}}
{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* The image, by digest when one is set, else by tag (default: the appVersion). */}}
{{- define "tally.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The binary a function runs: its `binary`, else its key. dict root, name, fn. */}}
{{- define "tally.binary" -}}
{{- .fn.binary | default .name }}
{{- end }}

{{- define "tally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "tally.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{/* The ConfigMap and the Secret every workload reads. */}}
{{- define "tally.configName" -}}
{{- include "tally.fullname" . }}
{{- end }}

{{- define "tally.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "tally.fullname" .) }}
{{- end }}

{{/*
The hook jobs run before the release's own objects exist (pre-install), so they read
copies of the ConfigMap and the Secret, and use a ServiceAccount, that are hooks
themselves (templates/hooks/config.yaml).
*/}}
{{- define "tally.hookName" -}}
{{- printf "%s-hooks" (include "tally.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The hook Jobs' ServiceAccount: the hook copy, or the existing one named in values. */}}
{{- define "tally.hookServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- include "tally.hookName" . }}
{{- else }}
{{- include "tally.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/* Plain settings: the data of the ConfigMap (and of its hook copy). */}}
{{- define "tally.configData" -}}
HOST: "0.0.0.0"
PORT: {{ .Values.containerPort | quote }}
RUST_LOG: {{ .Values.config.logLevel | quote }}
TALLY_STORE: {{ .Values.config.store | quote }}
{{- /* The S3 settings only for the S3 event store: with postgres the binaries ignore them. */}}
{{- if eq .Values.config.store "s3" }}
TALLY_S3_BUCKET: {{ .Values.config.s3.bucket | quote }}
{{- with .Values.config.s3.endpoint }}
TALLY_S3_ENDPOINT: {{ . | quote }}
{{- end }}
{{- with .Values.config.s3.prefix }}
TALLY_S3_PREFIX: {{ . | quote }}
{{- end }}
{{- end }}
AWS_REGION: {{ .Values.config.s3.region | quote }}
TALLY_KAFKA_BROKERS: {{ .Values.config.kafka.brokers | quote }}
TALLY_KAFKA_TOPIC: {{ .Values.config.kafka.topic | quote }}
TALLY_KAFKA_GROUP: {{ .Values.config.kafka.group | quote }}
TALLY_SAGA_GROUP: {{ .Values.config.kafka.sagaGroup | quote }}
{{- with .Values.config.redisPrefix }}
TALLY_REDIS_PREFIX: {{ . | quote }}
{{- end }}
TALLY_CURRENCY: {{ .Values.config.currency | quote }}
TALLY_MAX_AMOUNT: {{ .Values.config.maxAmount | quote }}
TALLY_SNAPSHOT_EVERY: {{ .Values.config.snapshotEvery | quote }}
TALLY_TRANSFER_DEADLINE_SECONDS: {{ .Values.config.transferDeadlineSeconds | quote }}
{{- /* Bearer tokens: none of TALLY_AUTH_* with auth off (no issuer: the binaries' "off"). */}}
{{- if .Values.auth.enabled }}
TALLY_AUTH_ISSUER: {{ .Values.auth.issuer | quote }}
TALLY_AUTH_AUDIENCE: {{ .Values.auth.audience | quote }}
{{- with .Values.auth.discoveryUrl }}
TALLY_AUTH_DISCOVERY_URL: {{ . | quote }}
{{- end }}
TALLY_AUTH_LEEWAY_SECONDS: {{ .Values.auth.leewaySeconds | quote }}
{{- with .Values.auth.legacyOwner }}
TALLY_AUTH_LEGACY_OWNER: {{ . | quote }}
{{- end }}
{{- end }}
{{- range $key, $value := .Values.config.env }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Credentials: the stringData of the Secret (and of its hook copy). */}}
{{- define "tally.secretData" -}}
AWS_ACCESS_KEY_ID: {{ .Values.secrets.awsAccessKeyId | quote }}
AWS_SECRET_ACCESS_KEY: {{ .Values.secrets.awsSecretAccessKey | quote }}
TALLY_DATABASE_URL: {{ .Values.secrets.databaseUrl | quote }}
{{- with .Values.secrets.eventStoreUrl }}
TALLY_EVENT_STORE_URL: {{ . | quote }}
{{- end }}
TALLY_REDIS_URL: {{ .Values.secrets.redisUrl | quote }}
{{- with .Values.secrets.streamKey }}
TALLY_STREAM_KEY: {{ . | quote }}
{{- end }}
{{- with .Values.secrets.masterKey }}
TALLY_MASTER_KEY: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The keys in a Deployment's env, from the release's Secret (or the existing one) by
name: TALLY_STREAM_KEY (the commit topic's HMAC key) and TALLY_MASTER_KEY (the master
key of the holders' data keys). Without either the pod does not start
(CreateContainerConfigError), rather than run with an unsigned topic or without
holder details — unless development: true, where both are optional.
*/}}
{{- define "tally.keysEnv" -}}
{{- range $key := list "TALLY_STREAM_KEY" "TALLY_MASTER_KEY" }}
- name: {{ $key }}
  valueFrom:
    secretKeyRef:
      name: {{ include "tally.secretName" $ }}
      key: {{ $key }}
      optional: {{ $.Values.development }}
{{- end }}
{{- end }}

{{/*
A checksum of the settings and the credentials, as a pod annotation: a change to
either rolls the pods. (A Secret named by existingSecret is not seen: roll by hand.)
*/}}
{{- define "tally.configChecksum" -}}
{{- printf "%s\n%s" (include "tally.configData" .) (include "tally.secretData" .) | sha256sum }}
{{- end }}

{{/*
Whether a function is rendered: enabled unless it says `enabled: false`.
Returns "true" or "" (Go templates have no booleans across include).
*/}}
{{- define "tally.enabled" -}}
{{- if (dig "enabled" true .) }}true{{ end }}
{{- end }}

{{/*
The fewest replicas a function runs with: its replicas, or the minimum of its
autoscaler. dict root, name, fn. A PodDisruptionBudget is rendered above one.
*/}}
{{- define "tally.minReplicas" -}}
{{- if (dig "keda" "enabled" false .fn) }}
{{- dig "keda" "min" .root.Values.keda.min .fn }}
{{- else if (dig "hpa" "enabled" false .fn) }}
{{- dig "hpa" "min" .root.Values.hpa.min .fn }}
{{- else }}
{{- dig "replicas" 1 .fn }}
{{- end }}
{{- end }}

{{/*
The Kafka consumer group a consumer's binary reads: the transfer saga's own
(TALLY_SAGA_GROUP, config.kafka.sagaGroup), else the projector's (TALLY_KAFKA_GROUP,
config.kafka.group). dict root, name, fn. Its lag is what KEDA scales on.
*/}}
{{- define "tally.consumerGroup" -}}
{{- if eq (include "tally.binary" .) "transfer-saga" }}
{{- .root.Values.config.kafka.sagaGroup }}
{{- else }}
{{- .root.Values.config.kafka.group }}
{{- end }}
{{- end }}

{{/* Whether the replica count is left to an autoscaler (HPA or KEDA): "true" or "". */}}
{{- define "tally.autoscaled" -}}
{{- if or (dig "hpa" "enabled" false .) (dig "keda" "enabled" false .) }}true{{ end }}
{{- end }}

{{/*
A route path in {param} syntax as a regular expression matching the whole path:
every {param} becomes one non-empty segment ([^/]+), every literal segment is quoted.
  /accounts/{id}/deposit  ->  ^/accounts/[^/]+/deposit$
The functions validate the id themselves (400 invalid-account-id), so the gateway only
needs to tell the routes apart.
*/}}
{{- define "tally.pathRegex" -}}
{{- $segments := list }}
{{- range (trimPrefix "/" .) | splitList "/" }}
{{- if regexMatch "^\\{[^}]+\\}$" . }}
{{- $segments = append $segments "[^/]+" }}
{{- else }}
{{- $segments = append $segments (regexQuoteMeta .) }}
{{- end }}
{{- end }}
{{- printf "^/%s$" (join "/" $segments) }}
{{- end }}

{{/* Whether a path has a {param} segment: "true" or "". */}}
{{- define "tally.pathHasParam" -}}
{{- if regexMatch "\\{[^}]+\\}" . }}true{{ end }}
{{- end }}

{{/*
The enabled functions that have public routes, sorted by name: a list of names.
(Output as JSON because include returns a string.)
*/}}
{{- define "tally.routedFunctions" -}}
{{- $names := list }}
{{- range $name, $fn := .Values.functions }}
{{- if and (include "tally.enabled" $fn) (eq $fn.kind "http") $fn.routes }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- $names | sortAlpha | toJson }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express. Rendered once (from
templates/validate.yaml); each failure stops the render with a message.
*/}}
{{- define "tally.validate" -}}
{{- $paths := dict }}
{{- range $name, $fn := .Values.functions }}
{{- if include "tally.enabled" $fn }}
{{- if and (dig "hpa" "enabled" false $fn) (dig "keda" "enabled" false $fn) }}
{{- fail (printf "functions.%s: hpa.enabled and keda.enabled are exclusive (KEDA makes its own HPA)" $name) }}
{{- end }}
{{- range $scaler := list "hpa" "keda" }}
{{- if and (dig $scaler "enabled" false $fn) (gt (dig $scaler "min" (get $.Values $scaler).min $fn | int) (dig $scaler "max" (get $.Values $scaler).max $fn | int)) }}
{{- fail (printf "functions.%s.%s: min is above max" $name $scaler) }}
{{- end }}
{{- end }}
{{- range $fn.routes }}
{{- /* An Ingress cannot match on the method: one path belongs to one function. */}}
{{- $owner := get $paths .path }}
{{- if and $owner (ne $owner $name) }}
{{- fail (printf "functions.%s.routes: path %s is already routed to %s; one path belongs to one function" $name .path $owner) }}
{{- end }}
{{- $_ := set $paths .path $name }}
{{- end }}
{{- end }}
{{- end }}
{{- /* One group would split the topic's partitions between the projector and the saga. */}}
{{- if eq .Values.config.kafka.group .Values.config.kafka.sagaGroup }}
{{- fail (printf "config.kafka.sagaGroup: %q is also config.kafka.group; the transfer saga and the projector each need their own consumer group" .Values.config.kafka.sagaGroup) }}
{{- end }}
{{- if .Values.rebuild.enabled }}
{{- $projector := get .Values.functions .Values.rebuild.projector }}
{{- if not (and $projector (include "tally.enabled" $projector) (eq $projector.kind "consumer")) }}
{{- fail (printf "rebuild.projector: %q is not an enabled function of kind consumer" .Values.rebuild.projector) }}
{{- end }}
{{- end }}
{{- /* `admin compact` fails on a store without segments: every run of the CronJob would. */}}
{{- if and .Values.compaction.enabled (ne .Values.config.store "s3") }}
{{- fail (printf "compaction.enabled: the %s event store (config.store) keeps no segments, so every run of `admin compact` would fail; compaction applies to config.store s3 only — set compaction.enabled: false" .Values.config.store) }}
{{- end }}
{{- if and .Values.httpRoute.enabled (gt (len (include "tally.routedFunctions" . | fromJsonArray)) 16) }}
{{- fail "httpRoute: an HTTPRoute holds at most 16 rules (one per routed function); split the functions across releases" }}
{{- end }}
{{- /* Who may do what: no silent "authentication off". */}}
{{- if and .Values.auth.enabled (not .Values.auth.issuer) }}
{{- fail "auth.issuer: required while auth.enabled is true — the OpenID Connect issuer whose bearer tokens every route requires (TALLY_AUTH_ISSUER, e.g. https://login.example.com/realms/tally); to run without authentication, set auth.enabled: false explicitly" }}
{{- end }}
{{- /* The chart's own Secret only: an existing Secret is yours to fill. */}}
{{- if and (not .Values.development) (not .Values.secrets.existingSecret) }}
{{- $found := include "tally.developmentCredentials" . | fromJsonArray }}
{{- if $found }}
{{- fail (printf "secrets: the built-in development credentials of k8s/ (%s) are refused outside development; set credentials of your own (or secrets.existingSecret), or development: true for a development cluster" (join ", " $found)) }}
{{- end }}
{{- if not .Values.secrets.streamKey }}
{{- fail "secrets.streamKey: required — the key that signs and checks every message on the commit topic (TALLY_STREAM_KEY, base64 of at least 32 bytes: openssl rand -base64 32), or secrets.existingSecret holding TALLY_STREAM_KEY; development: true runs without one (the topic is then trusted)" }}
{{- end }}
{{- if not .Values.secrets.masterKey }}
{{- fail "secrets.masterKey: required — the master key that wraps each account holder's data key (TALLY_MASTER_KEY, base64 of exactly 32 bytes: openssl rand -base64 32), or secrets.existingSecret holding TALLY_MASTER_KEY; development: true runs without one (no account can then be opened with holder details)" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The values that still hold the built-in development credentials of k8s/ (MinIO's
root user tally / tally-secret, PostgreSQL's password tally; the chart's defaults), as
a JSON list of "<value> (<what>)". The S3 keys count with config.store s3 only (with
postgres they are not used).
*/}}
{{- define "tally.developmentCredentials" -}}
{{- $found := list }}
{{- if and (eq .Values.config.store "s3") (eq .Values.secrets.awsSecretAccessKey "tally-secret") }}
{{- $found = append $found "secrets.awsSecretAccessKey (MinIO's tally-secret)" }}
{{- end }}
{{- range $key := list "databaseUrl" "eventStoreUrl" }}
{{- $url := get $.Values.secrets $key | default "" }}
{{- $pattern := "^postgres(?:ql)?://[^:@/]*:([^@/]*)@.*$" }}
{{- if and (regexMatch $pattern $url) (eq (regexReplaceAll $pattern $url "${1}") "tally") }}
{{- $found = append $found (printf "secrets.%s (the PostgreSQL password tally)" $key) }}
{{- end }}
{{- end }}
{{- $found | toJson }}
{{- end }}

{{/* The pod-level securityContext of every workload: non-root, RuntimeDefault seccomp. */}}
{{- define "tally.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The container-level securityContext: read-only root, no privilege, no capability. */}}
{{- define "tally.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Where the settings and credentials come from: the ConfigMap and Secret (root context). */}}
{{- define "tally.envFrom" -}}
- configMapRef:
    name: {{ include "tally.configName" . }}
- secretRef:
    name: {{ include "tally.secretName" . }}
{{- end }}

{{/* A function's extra variables (values env): a list of EnvVar. */}}
{{- define "tally.extraEnv" -}}
{{- range $key, $value := . }}
- name: {{ $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Pod placement shared by every workload (root context), indented by the caller. */}}
{{- define "tally.podPlacement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The writable scratch space of a read-only root filesystem: an emptyDir at /tmp.
tally.tmpVolume goes under `volumes:`, tally.tmpMount under `volumeMounts:`.
*/}}
{{- define "tally.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{- define "tally.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
The annotations of a hook (pre-install, pre-upgrade) of the given weight: dict weight.
Lower weights run first: the hook config (-30), then the jobs by their hookWeight.
*/}}
{{- define "tally.hookAnnotations" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: {{ .weight | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}

{{/* Whether any function of kind job is enabled: "true" or "". */}}
{{- define "tally.hasHookJobs" -}}
{{- range $name, $fn := .Values.functions }}
{{- if and (include "tally.enabled" $fn) (eq $fn.kind "job") }}true{{ end }}
{{- end }}
{{- end }}
