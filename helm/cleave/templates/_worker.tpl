{{/*
The Deployment of one worker pool (prefill-deployment.yaml, decode-deployment.yaml).
Arg: (dict "root" $ "pool" "prefill"|"decode").

One replica = one instance = one pod; `cleave worker` spawns the instance's ranks inside it.
The worker advertises --host in Redis, so it binds the pod IP (downward API). On SIGTERM it
drains for up to --drain-timeout seconds; the grace period is longer than that.
*/}}
{{- define "cleave.worker.deployment" -}}
{{- $root := .root }}
{{- $poolName := .pool }}
{{- $pool := index $root.Values $poolName }}
{{- $ctx := dict "root" $root "component" $poolName }}
{{- $resources := deepCopy (default dict $pool.resources) }}
{{- if $root.Values.gpu.enabled }}
{{- $limits := default dict (get $resources "limits") }}
{{- $_ := set $limits $root.Values.gpu.resourceName (include "cleave.gpus" . | int) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "cleave.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "cleave.labels" $ctx | nindent 4 }}
  annotations:
    cleave/ranks-per-instance: {{ include "cleave.ranks" . | quote }}
spec:
  replicas: {{ int $pool.replicaCount }}
  selector:
    matchLabels:
      {{- include "cleave.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "cleave.labels" $ctx | nindent 8 }}
      annotations:
        {{- include "cleave.configChecksum" $root | nindent 8 }}
        {{- with include "cleave.scrapeAnnotations" (dict "root" $root "port" $pool.metricsPort) }}
        {{- . | trim | nindent 8 }}
        {{- end }}
        {{- with $pool.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ include "cleave.terminationGrace" . }}
      {{- with include "cleave.imagePullSecrets" $root }}
      {{- . | trim | nindent 6 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with include "cleave.scheduling" $pool }}
      {{- . | trim | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ $poolName }}
          image: {{ include "cleave.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            - worker
            - {{ $poolName }}
            - --host=$(POD_IP)
            - --port={{ int $pool.port }}
            - --metrics-port={{ int $pool.metricsPort }}
            - --worker-id=$(POD_NAME)
            - --redis-url=$(CLEAVE_REDIS_URL)
            - --key-prefix=$(CLEAVE_KEY_PREFIX)
            - --model=$(CLEAVE_MODEL)
            - --transport=$(CLEAVE_TRANSPORT)
            - --kv-cache-mb={{ int $pool.kvCacheMb }}
            - --drain-timeout={{ int $pool.drainTimeoutSeconds }}
            {{- range $axis, $degree := $pool.layout }}
            - --{{ $axis }}={{ int $degree }}
            {{- end }}
            {{- if eq $poolName "decode" }}
            - --max-batch={{ int $pool.maxBatch }}
            {{- end }}
            {{- range $pool.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- include "cleave.env" $root | trim | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $pool.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $pool.metricsPort }}
              protocol: TCP
          # The port is bound once the model is loaded and every rank is up.
          startupProbe:
            grpc:
              port: {{ $pool.port }}
            periodSeconds: 10
            failureThreshold: {{ max 1 (div (int $pool.startupTimeoutSeconds) 10) }}
          # The kubelet stops liveness probes once a pod is terminating, so a draining worker
          # (NOT_SERVING) is not restarted.
          livenessProbe:
            grpc:
              port: {{ $pool.port }}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 3
          readinessProbe:
            grpc:
              port: {{ $pool.port }}
            periodSeconds: 5
            timeoutSeconds: 5
            failureThreshold: 2
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          volumeMounts:
            - name: shm
              mountPath: /dev/shm
            {{- with include "cleave.modelVolumeMount" $root }}
            {{- . | trim | nindent 12 }}
            {{- end }}
      volumes:
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $root.Values.sharedMemorySize }}
        {{- with include "cleave.modelVolume" $root }}
        {{- . | trim | nindent 8 }}
        {{- end }}
{{- end }}

{{/*
The headless Service that exposes one pool's metrics port to a ServiceMonitor
(prefill-metrics-service.yaml, decode-metrics-service.yaml; rendered with metrics.serviceMonitor).
Arg: (dict "root" $ "pool" "prefill"|"decode").
*/}}
{{- define "cleave.worker.metricsService" -}}
{{- $ctx := dict "root" .root "component" .pool }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "cleave.componentName" $ctx }}-metrics
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "cleave.labels" $ctx | nindent 4 }}
    cleave/metrics: "true"
spec:
  clusterIP: None
  selector:
    {{- include "cleave.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: metrics
      port: {{ (index .root.Values .pool).metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- end }}
