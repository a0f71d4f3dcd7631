{{/*
The Deployment of one worker pool whose instances fit on one node (prefill-deployment.yaml,
decode-deployment.yaml; nodesPerInstance > 1 renders cleave.worker.leaderWorkerSet instead).
Arg: (dict "root" $ "pool" "prefill"|"decode").

One replica = one instance = one pod; `cleave worker` spawns the instance's ranks inside it.
The worker advertises --host in Redis, so it binds the pod IP (downward API). On SIGTERM it
drains for up to --drain-timeout seconds; the grace period is longer than that.
*/}}
{{- define "cleave.worker.deployment" -}}
{{- $root := .root }}
{{- $pool := index $root.Values .pool }}
{{- $ctx := dict "root" $root "component" .pool }}
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
    {{- include "cleave.worker.pod" (dict "root" $root "pool" .pool "role" "single") | trim | nindent 4 }}
{{- end }}

{{/*
The pod template (metadata and spec) of a worker pool's pods.
Arg: (dict "root" $ "pool" "prefill"|"decode" "role" R), R one of:
  single  the one pod of a one-node instance (a Deployment's pods): `cleave worker`, all ranks;
  leader  node 0 of a multi-node instance: `cleave worker`, ranks 0..G-1 (G = ranks per node),
          the gRPC service, the rendezvous store and the Redis registration;
  rank    node k >= 1 of a multi-node instance: `cleave rank`, ranks k*G..k*G+G-1; no gRPC,
          no Redis, no probes, no secrets. It exits when the leader goes away.
Leader and rank pods carry the label cleave/role; a pod asks for its node's share of the GPUs.
*/}}
{{- define "cleave.worker.pod" -}}
{{- $root := .root }}
{{- $poolName := .pool }}
{{- $role := .role }}
{{- $pool := index $root.Values $poolName }}
{{- $ctx := dict "root" $root "component" $poolName }}
{{- $poolCtx := dict "root" $root "pool" $poolName }}
{{- $nodes := include "cleave.nodes" $poolCtx | int }}
{{- $serving := ne $role "rank" }}
{{- $resources := deepCopy (default dict $pool.resources) }}
{{- if $root.Values.gpu.enabled }}
{{- $limits := default dict (get $resources "limits") }}
{{- $_ := set $limits $root.Values.gpu.resourceName (div (include "cleave.gpus" $poolCtx | int) $nodes) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
metadata:
  labels:
    {{- include "cleave.labels" $ctx | nindent 4 }}
    {{- if ne $role "single" }}
    cleave/role: {{ $role }}
    {{- end }}
  annotations:
    {{- include "cleave.configChecksum" $root | nindent 4 }}
    {{- if $serving }}
    {{- with include "cleave.scrapeAnnotations" (dict "root" $root "port" $pool.metricsPort) }}
    {{- . | trim | nindent 4 }}
    {{- end }}
    {{- end }}
    {{- with $pool.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ include "cleave.terminationGrace" $poolCtx }}
  {{- with include "cleave.imagePullSecrets" $root }}
  {{- . | trim | nindent 2 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with include "cleave.scheduling" $pool }}
  {{- . | trim | nindent 2 }}
  {{- end }}
  containers:
    - name: {{ $poolName }}
      image: {{ include "cleave.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args:
        {{- if $serving }}
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
        {{- else }}
        - rank
        - {{ $poolName }}
        - --host=$(POD_IP)
        - --model=$(CLEAVE_MODEL)
        - --transport=$(CLEAVE_TRANSPORT)
        - --kv-cache-mb={{ int $pool.kvCacheMb }}
        {{- end }}
        {{- range $axis, $degree := $pool.layout }}
        - --{{ $axis }}={{ int $degree }}
        {{- end }}
        {{- if eq $poolName "decode" }}
        - --max-batch={{ int $pool.maxBatch }}
        {{- end }}
        {{- if ne $role "single" }}
        - --device={{ ternary "cuda" "cpu" $root.Values.gpu.enabled }}
        {{- if eq $role "rank" }}
        - --node-rank=$(LWS_WORKER_INDEX)
        {{- end }}
        - --nproc-per-node={{ include "cleave.ranksPerNode" $poolCtx }}
        {{- if eq $role "rank" }}
        - --master-addr=$(LWS_LEADER_ADDRESS)
        {{- end }}
        - --master-port={{ int $pool.rendezvousPort }}
        {{- end }}
        {{- range $pool.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        {{- if $serving }}
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- include "cleave.env" $root | trim | nindent 8 }}
        {{- else }}
        {{- include "cleave.configEnv" $root | trim | nindent 8 }}
        {{- end }}
      {{- if $serving }}
      ports:
        - name: grpc
          containerPort: {{ $pool.port }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $pool.metricsPort }}
          protocol: TCP
        {{- if eq $role "leader" }}
        - name: rendezvous
          containerPort: {{ $pool.rendezvousPort }}
          protocol: TCP
        {{- end }}
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
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: shm
          mountPath: /dev/shm
        {{- with include "cleave.modelVolumeMount" $root }}
        {{- . | trim | nindent 8 }}
        {{- end }}
  volumes:
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.sharedMemorySize }}
    {{- with include "cleave.modelVolume" $root }}
    {{- . | trim | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
The headless Service that exposes one pool's metrics port to a ServiceMonitor
(prefill-metrics-service.yaml, decode-metrics-service.yaml; rendered with metrics.serviceMonitor).
Arg: (dict "root" $ "pool" "prefill"|"decode"). Of a pool that spans nodes it selects the leader
pods only: the other nodes' rank processes serve no metrics.
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
    {{- if gt (include "cleave.nodes" .| int) 1 }}
    cleave/role: leader
    {{- end }}
  ports:
    - name: metrics
      port: {{ (index .root.Values .pool).metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- end }}
