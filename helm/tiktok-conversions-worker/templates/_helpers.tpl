{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "tiktok-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name alone when it already holds the chart name.
*/}}
{{- define "tiktok-worker.fullname" -}}
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

{{- define "tiktok-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tiktok-worker.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tiktok-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tiktok-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tiktok-worker.labels" -}}
helm.sh/chart: {{ include "tiktok-worker.chart" . }}
{{ include "tiktok-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/part-of: tiktok-conversions-worker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tiktok-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tiktok-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tiktok-worker.secretName" -}}
{{- default (include "tiktok-worker.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{- define "tiktok-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Upper bound of the replica count: what the rate limiter's local fallback divides the qps by, so
that the fallback rates of all pods together never exceed the configured qps.
*/}}
{{- define "tiktok-worker.maxReplicas" -}}
{{- if .Values.keda.enabled }}
{{- .Values.keda.maxReplicas | int }}
{{- else if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.maxReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}

{{/*
Checks that JSON schema cannot express (relations between values). Included by the Deployment,
so every render runs them.
*/}}
{{- define "tiktok-worker.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive (KEDA creates its own HPA)" }}
{{- end }}
{{- $partitions := .Values.topicPartitions }}
{{- if and (or .Values.autoscaling.enabled .Values.keda.enabled) (not $partitions) }}
{{- fail "topicPartitions is required with autoscaling.enabled or keda.enabled: replicas may never exceed the partition count" }}
{{- end }}
{{- if $partitions }}
{{- $max := include "tiktok-worker.maxReplicas" . | int }}
{{- if gt $max ($partitions | int) }}
{{- fail (printf "the replica upper bound (%d) exceeds topicPartitions (%d): extra consumers would sit idle" $max ($partitions | int)) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (.Values.autoscaling.minReplicas | int) (.Values.autoscaling.maxReplicas | int)) }}
{{- fail "autoscaling.minReplicas exceeds autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (.Values.keda.minReplicas | int) (.Values.keda.maxReplicas | int)) }}
{{- fail "keda.minReplicas exceeds keda.maxReplicas" }}
{{- end }}
{{- $drain := .Values.config.kafka.drain_timeout_s | float64 }}
{{- with .Values.terminationGracePeriodSeconds }}
{{- if le (. | float64) (addf $drain 10) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.kafka.drain_timeout_s + 10 (%v): the worker needs the drain time plus its shutdown margin" . (addf $drain 10)) }}
{{- end }}
{{- end }}
{{- with .Values.kafkaTls }}
{{- if and .existingSecret (ne (empty .certKey) (empty .keyKey)) }}
{{- fail "kafkaTls.certKey and kafkaTls.keyKey go together: a client certificate needs its key" }}
{{- end }}
{{- end }}
{{- $sec := default dict .Values.config.kafka.security }}
{{- range $key := list "password" "key_password" }}
{{- $v := index $sec $key }}
{{- if and $v (not (regexMatch "^\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}$" (toString $v))) }}
{{- fail (printf "config.kafka.security.%s must be a ${VAR} reference to an environment variable from a Secret (or use kafkaSasl.existingSecret), not a literal" $key) }}
{{- end }}
{{- end }}
{{- range $i, $d := .Values.config.destinations }}
{{- if not (regexMatch "^\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}$" (toString $d.access_token)) }}
{{- fail (printf "config.destinations[%d].access_token must be a ${VAR} reference to an environment variable from the Secret, not a literal token" $i) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Seconds Kubernetes waits after SIGTERM: the drain time, the worker's 10 s shutdown margin and
10 s for the final commit and leaving the group, unless set explicitly.
*/}}
{{- define "tiktok-worker.terminationGracePeriodSeconds" -}}
{{- if .Values.terminationGracePeriodSeconds }}
{{- .Values.terminationGracePeriodSeconds | int }}
{{- else }}
{{- addf (.Values.config.kafka.drain_timeout_s | float64) 20 | ceil | int }}
{{- end }}
{{- end }}

{{/*
The worker config as YAML: the `config` values with the computed rate_limit.expected_replicas.
*/}}
{{- define "tiktok-worker.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $rl := default dict $cfg.rate_limit }}
{{- if not $rl.expected_replicas }}
{{- $_ := set $rl "expected_replicas" (include "tiktok-worker.maxReplicas" . | int) }}
{{- end }}
{{- $_ := set $cfg "rate_limit" $rl }}
{{- $kafka := default dict $cfg.kafka }}
{{- $sec := default dict $kafka.security }}
{{- with .Values.kafkaTls }}
{{- if .existingSecret }}
{{- if and .caKey (not $sec.ca_file) }}
{{- $_ := set $sec "ca_file" (printf "%s/%s" .mountPath .caKey) }}
{{- end }}
{{- if and .certKey (not $sec.cert_file) }}
{{- $_ := set $sec "cert_file" (printf "%s/%s" .mountPath .certKey) }}
{{- end }}
{{- if and .keyKey (not $sec.key_file) }}
{{- $_ := set $sec "key_file" (printf "%s/%s" .mountPath .keyKey) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.kafkaSasl.existingSecret }}
{{- if not (or $sec.password $sec.password_file) }}
{{- $_ := set $sec "password" "${KAFKA_SASL_PASSWORD}" }}
{{- end }}
{{- if and .Values.kafkaSasl.usernameKey (not $sec.username) }}
{{- $_ := set $sec "username" "${KAFKA_SASL_USERNAME}" }}
{{- end }}
{{- end }}
{{- if $sec }}
{{- $_ := set $kafka "security" $sec }}
{{- end }}
{{- $_ := set $cfg "kafka" $kafka }}
{{- if .Values.staticMembership }}
{{- $kafka := default dict $cfg.kafka }}
{{- $client := default dict $kafka.client }}
{{- $_ := set $client "group.instance.id" "${POD_NAME}" }}
{{- $_ := set $kafka "client" $client }}
{{- $_ := set $cfg "kafka" $kafka }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
The series selector the alert expressions use for this release.
*/}}
{{- define "tiktok-worker.alertSelector" -}}
{{- if .Values.prometheusRule.selector }}
{{- .Values.prometheusRule.selector }}
{{- else }}
{{- printf "job=%q,namespace=%q" (include "tiktok-worker.fullname" .) (include "tiktok-worker.namespace" .) }}
{{- end }}
{{- end }}
