{{/*
Names, labels and the values every template derives the same way.
All helpers are namespaced "cleave."; those taking a component or pool take a dict:
  (dict "root" $ "component" "router")   or   (dict "root" $ "pool" "prefill")
*/}}

{{- define "cleave.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name. */}}
{{- define "cleave.fullname" -}}
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

{{/* Name of one component's resources: <fullname>-<component>. */}}
{{- define "cleave.componentName" -}}
{{- printf "%s-%s" (include "cleave.fullname" .root | trunc 50 | trimSuffix "-") .component }}
{{- end }}

{{- define "cleave.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cleave.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cleave.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cleave.labels" -}}
helm.sh/chart: {{ include "cleave.chart" .root }}
{{ include "cleave.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cleave
{{- end }}

{{- define "cleave.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "cleave.configMapName" -}}
{{- include "cleave.componentName" (dict "root" . "component" "config") }}
{{- end }}

{{/* ---- Redis ---- */}}

{{- define "cleave.redisUrl" -}}
{{- if eq .Values.redis.mode "external" }}
{{- .Values.redis.external.url }}
{{- else }}
{{- printf "redis://%s:%d/0" (include "cleave.componentName" (dict "root" . "component" "redis")) (int .Values.redis.port) }}
{{- end }}
{{- end }}

{{- define "cleave.redisSecretName" -}}
{{- default (include "cleave.componentName" (dict "root" . "component" "redis")) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "cleave.internalSecretName" -}}
{{- default (include "cleave.componentName" (dict "root" . "component" "internal-token")) .Values.internalAuth.existingSecret }}
{{- end }}

{{/* ---- Pools ---- */}}

{{/* Rank processes of one instance: prefill tp*cp, decode pp*max(tp, ep). Arg: (dict "root" $ "pool" P). */}}
{{- define "cleave.ranks" -}}
{{- $layout := (index .root.Values .pool).layout }}
{{- if eq .pool "prefill" }}
{{- mul $layout.tp $layout.cp }}
{{- else }}
{{- mul $layout.pp (max $layout.tp $layout.ep) }}
{{- end }}
{{- end }}

{{/* GPUs requested per instance: gpusPerInstance, or the ranks when it is 0. */}}
{{- define "cleave.gpus" -}}
{{- $pool := index .root.Values .pool }}
{{- if gt (int $pool.gpusPerInstance) 0 }}
{{- int $pool.gpusPerInstance }}
{{- else }}
{{- include "cleave.ranks" . }}
{{- end }}
{{- end }}

{{/* Nodes (pods) one instance spans: nodesPerInstance, 1 when unset. Arg: (dict "root" $ "pool" P). */}}
{{- define "cleave.nodes" -}}
{{- int (default 1 (index .root.Values .pool).nodesPerInstance) }}
{{- end }}

{{/* Ranks each node (pod) of an instance runs: the ranks over the nodes (validate.yaml checks they divide). */}}
{{- define "cleave.ranksPerNode" -}}
{{- div (include "cleave.ranks" . | int) (max 1 (include "cleave.nodes" . | int)) }}
{{- end }}

{{- define "cleave.terminationGrace" -}}
{{- $pool := index .root.Values .pool }}
{{- if gt (int $pool.terminationGracePeriodSeconds) 0 }}
{{- int $pool.terminationGracePeriodSeconds }}
{{- else }}
{{- add (int $pool.drainTimeoutSeconds) 30 }}
{{- end }}
{{- end }}

{{/* ---- Pods ---- */}}

{{/* Environment of every Cleave container: the shared ConfigMap and the Redis password. */}}
{{- define "cleave.env" -}}
{{- include "cleave.configEnv" . }}
{{- if .Values.redis.auth.enabled }}
- name: CLEAVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cleave.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
{{- end }}
{{- if .Values.internalAuth.enabled }}
- name: CLEAVE_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cleave.internalSecretName" . }}
      key: {{ .Values.internalAuth.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The shared ConfigMap's settings alone: what the rank pods of a multi-node instance read
(they talk to neither Redis nor the internal APIs, so they get no secret). */}}
{{- define "cleave.configEnv" -}}
{{- $cm := include "cleave.configMapName" . }}
{{- range $var := list "CLEAVE_REDIS_URL" "CLEAVE_KEY_PREFIX" "CLEAVE_MODEL" "CLEAVE_TRANSPORT" "CLEAVE_LOG_LEVEL" }}
- name: {{ $var }}
  valueFrom:
    configMapKeyRef:
      name: {{ $cm }}
      key: {{ $var }}
{{- end }}
{{- end }}

{{/* Pod annotations that roll the pods when the shared configuration changes. */}}
{{- define "cleave.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{- define "cleave.modelVolumeMount" -}}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "cleave.modelVolume" -}}
{{- if .Values.model.volume }}
- name: model
{{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling of a component: its nodeSelector, affinity and tolerations. Arg: its values. */}}
{{- define "cleave.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "cleave.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Pod annotations for Prometheus discovery by annotation (metrics.podAnnotations).
Arg: (dict "root" $ "port" <metrics port>).
*/}}
{{- define "cleave.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | int | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
