{{/*
The workload of one worker pool: a Deployment when an instance fits on one node, a
LeaderWorkerSet when it spans nodesPerInstance > 1 nodes (prefill-deployment.yaml,
decode-deployment.yaml). Arg: (dict "root" $ "pool" "prefill"|"decode").
*/}}
{{- define "cleave.worker.workload" -}}
{{- if gt (include "cleave.nodes" . | int) 1 }}
{{- include "cleave.worker.leaderWorkerSet" . }}
{{- else }}
{{- include "cleave.worker.deployment" . }}
{{- end }}
{{- end }}

{{/* ", over N nodes" for a pool whose instances span N > 1 nodes, else nothing (NOTES.txt). */}}
{{- define "cleave.notes.nodes" -}}
{{- $nodes := include "cleave.nodes" . | int }}
{{- if gt $nodes 1 }}, over {{ $nodes }} nodes{{ end }}
{{- end }}

{{/* "deployment/NAME" or "leaderworkerset/NAME": how the planner names a pool's workload. */}}
{{- define "cleave.worker.workloadRef" -}}
{{- $kind := ternary "leaderworkerset" "deployment" (gt (include "cleave.nodes" . | int) 1) }}
{{- printf "%s/%s" $kind (include "cleave.componentName" (dict "root" .root "component" .pool)) }}
{{- end }}

{{/*
The LeaderWorkerSet (leaderworkerset.x-k8s.io/v1, the LWS controller must be installed) of a
pool whose instances span N = nodesPerInstance nodes. Arg: (dict "root" $ "pool" P).

One replica (group) = one instance = N pods, each running G = ranks / N of its ranks on G GPUs:
  - the leader pod (LWS worker index 0) runs `cleave worker` with ranks 0..G-1. It binds the
    rendezvous store on its pod IP (--host, --master-port), serves the gRPC API, registers in
    Redis and is probed, scraped and drained exactly like a one-node instance's pod;
  - worker pod k (1..N-1) runs `cleave rank` with ranks k*G..k*G+G-1, joining the leader's store
    at $(LWS_LEADER_ADDRESS) (the leader pod's name in LWS's headless Service). LWS injects
    LWS_LEADER_ADDRESS, LWS_WORKER_INDEX and LWS_GROUP_SIZE into every container, and the kubelet
    expands $(VAR) in args from them.
startupPolicy LeaderCreated: the workers start with the leader (LeaderReady would wait forever,
as the leader turns ready only once every rank has joined). restartPolicy
RecreateGroupOnPodRestart: a lost rank takes the instance down and the group restarts as a whole.
The planner scales the LeaderWorkerSet's replicas through its scale subresource.
*/}}
{{- define "cleave.worker.leaderWorkerSet" -}}
{{- $root := .root }}
{{- $pool := index $root.Values .pool }}
{{- $ctx := dict "root" $root "component" .pool }}
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
metadata:
  name: {{ include "cleave.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "cleave.labels" $ctx | nindent 4 }}
  annotations:
    cleave/ranks-per-instance: {{ include "cleave.ranks" . | quote }}
    cleave/nodes-per-instance: {{ include "cleave.nodes" . | quote }}
spec:
  replicas: {{ int $pool.replicaCount }}
  startupPolicy: LeaderCreated
  leaderWorkerTemplate:
    size: {{ include "cleave.nodes" . }}
    restartPolicy: RecreateGroupOnPodRestart
    leaderTemplate:
      {{- include "cleave.worker.pod" (dict "root" $root "pool" .pool "role" "leader") | trim | nindent 6 }}
    workerTemplate:
      {{- include "cleave.worker.pod" (dict "root" $root "pool" .pool "role" "rank") | trim | nindent 6 }}
{{- end }}
