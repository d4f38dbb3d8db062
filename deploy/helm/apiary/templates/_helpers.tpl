{{/* The release's base name, at most 50 characters (room for "-expert-server"). */}}
{{- define "apiary.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "apiary.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object; pass (dict "root" $ "component" "dht"). */}}
{{- define "apiary.labels" -}}
{{ include "apiary.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: apiary
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "apiary.componentSelector" -}}
{{ include "apiary.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A container's image and pull policy: the chart's image values, overridden by the workload's own
(`own`: registry, repository, tag, pullPolicy); the expert server and the trainer in the variant
of their device (<version>-cuda with GPUs, else <version>-cpu), as `make images` tags them. Pass
(dict "root" $ "service" "dht" "own" $dht.image "gpus" 0). */}}
{{- define "apiary.imageFields" -}}
{{- $image := .root.Values.image -}}
{{- $own := .own | default (dict) -}}
{{- $registry := $own.registry | default $image.registry -}}
{{- $repository := $own.repository | default (printf "%s/%s" $image.repositoryPrefix .service) -}}
{{- $tag := $image.tag | default .root.Chart.AppVersion -}}
{{- if has .service (list "expert-server" "trainer") }}
{{- $tag = printf "%s-%s" $tag (ternary "cuda" "cpu" (gt (int .gpus) 0)) -}}
{{- end }}
image: {{ printf "%s%s:%s" (ternary "" (printf "%s/" $registry) (empty $registry)) $repository ($own.tag | default $tag) }}
imagePullPolicy: {{ $own.pullPolicy | default $image.pullPolicy }}
{{- end -}}

{{/* A pod template's metadata: the component's labels, plus podLabels and podAnnotations (the
chart's, then the workload's own); pass (dict "root" $ "component" "dht" "values" $dht). */}}
{{- define "apiary.podMetadata" -}}
labels:
  {{- include "apiary.labels" (dict "root" .root "component" .component) | nindent 2 }}
  {{- with merge (dict) (.values.podLabels | default (dict)) (.root.Values.podLabels | default (dict)) }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with merge (dict) (.values.podAnnotations | default (dict)) (.root.Values.podAnnotations | default (dict)) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A pod's priorityClassName (the workload's, else the chart's) and topologySpreadConstraints;
pass (dict "root" $ "values" $dht). */}}
{{- define "apiary.podExtras" -}}
{{- with .values.priorityClassName | default .root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The Secret with the chart's Redis password (key "password"). */}}
{{- define "apiary.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "apiary.fullname" .)) -}}
{{- end -}}

{{/* The address the DHT's local API has for this participant's other services. */}}
{{- define "apiary.dhtLocal" -}}
{{- printf "%s-dht:%d" (include "apiary.fullname" .) (int .Values.dht.ports.local) -}}
{{- end -}}

{{/* Whether pods read their announced host with the announce init container (exposure.mode
LoadBalancer, NodePort or hostNetwork): "true" or "". */}}
{{- define "apiary.readsAnnounce" -}}
{{- if has .Values.exposure.mode (list "LoadBalancer" "NodePort" "hostNetwork") }}true{{ end -}}
{{- end -}}

{{/* The announce settings of a public service's container from exposure.mode (podIP: the pod's
address; relayed: reached through relays; otherwise the script's lines of apiary.announceLines);
pass (dict "root" $ "service" "dht"). The dht's reachability is its own (dht.reachability). */}}
{{- define "apiary.exposureEnv" -}}
{{- $exposure := .root.Values.exposure -}}
{{- if eq $exposure.mode "podIP" }}
- name: APIARY_ANNOUNCE_HOST
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- else if eq $exposure.mode "relayed" }}
{{- if ne .service "dht" }}
- name: APIARY_REACHABILITY
  value: relayed
{{- end }}
- name: APIARY_RELAYS
  value: {{ $exposure.relayed.reservations | default 2 | quote }}
{{- end }}
{{- end -}}

{{/* The lines of a public service's script that set what it announces, found by the announce init
container, and with NodePort its pod's node ports; pass (dict "root" $ "service" ..). */}}
{{- define "apiary.announceLines" -}}
{{- $exposure := .root.Values.exposure -}}
{{- if and (include "apiary.readsAnnounce" .root) (has .service (list "dht" "expert-server" "averager")) }}
. /run/apiary/announce/env
{{- if eq $exposure.mode "NodePort" }}
{{- $base := get (dict "dht" $exposure.nodePort.dht "expert-server" $exposure.nodePort.expertServer "averager" $exposure.nodePort.averager) .service }}
export APIARY_ANNOUNCE_PORT="$(({{ $base }} + ordinal))"
{{- if eq .service "averager" }}
export APIARY_ANNOUNCE_BULK_PORT="$(({{ $exposure.nodePort.averagerBulk }} + ordinal))"
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The pod-level fields of a public workload from exposure.mode: the node's network, or the
service account the announce init container reads the API with (its token mounted in that
container alone); pass $. */}}
{{- define "apiary.exposurePod" -}}
{{- if eq .Values.exposure.mode "hostNetwork" }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- if include "apiary.readsAnnounce" . }}
serviceAccountName: {{ include "apiary.fullname" . }}-announce
{{- end }}
{{- end -}}

{{/* The announce init container (files/announce.py, from the dht image); pass $. */}}
{{- define "apiary.announceInit" -}}
{{- if include "apiary.readsAnnounce" . }}
initContainers:
  - name: announce
    {{- include "apiary.imageFields" (dict "root" . "service" "dht" "own" .Values.dht.image) | nindent 4 }}
    command: ["python3", "/etc/apiary/announce-script/announce.py",
              {{ ternary "loadbalancer" "node" (eq .Values.exposure.mode "LoadBalancer") | quote }},
              "--out", "/run/apiary/announce/env", "--timeout", {{ .Values.exposure.announceTimeout | default 900 | quote }}]
    env:
      - name: POD_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      - name: NODE_NAME
        valueFrom:
          fieldRef:
            fieldPath: spec.nodeName
      - name: ANNOUNCE_HOSTS
        value: {{ .Values.exposure.hosts | default (dict) | toJson | quote }}
    resources:
      requests: {cpu: 10m, memory: 32Mi}
      limits: {memory: 64Mi}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: announce-script
        mountPath: /etc/apiary/announce-script
        readOnly: true
      - name: announce
        mountPath: /run/apiary/announce
      - name: announce-api
        mountPath: /var/run/secrets/kubernetes.io/serviceaccount
        readOnly: true
{{- end }}
{{- end -}}

{{/* The mount of the announce file in a public service's container; pass $. */}}
{{- define "apiary.announceMount" -}}
{{- if include "apiary.readsAnnounce" . }}
- name: announce
  mountPath: /run/apiary/announce
  readOnly: true
{{- end }}
{{- end -}}

{{/* The volumes of the announce init container: its script, the file it writes, and the API
credentials automountServiceAccountToken would give every container; pass $. */}}
{{- define "apiary.announceVolumes" -}}
{{- if include "apiary.readsAnnounce" . }}
- name: announce-script
  configMap:
    name: {{ include "apiary.fullname" . }}-announce
- name: announce
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: announce-api
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items: [{key: ca.crt, path: ca.crt}]
      - downwardAPI:
          items:
            - path: namespace
              fieldRef: {fieldPath: metadata.namespace}
{{- end }}
{{- end -}}

{{/* Settings every service shares: tracing, TLS and the run authority (the access token is each
container's own: see apiary.ownFiles). */}}
{{- define "apiary.commonEnv" -}}
- name: APIARY_TRACING
  value: {{ .Values.tracing.exporter | quote }}
{{- with .Values.tracing.otlpEndpoint }}
- name: APIARY_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: APIARY_TLS
  value: {{ .Values.security.tls | quote }}
{{- with .Values.security.runAuthority }}
- name: APIARY_RUN_AUTHORITY
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The lines of a container's script that point the service at its own files, named after the
service and the pod's ordinal (which only a shell can cut from POD_NAME): its identity from the
workload's Secret, its access token from security.accessTokens. Pass (dict "root" $ "service"
"averager" "identitySecret" ..). */}}
{{- define "apiary.ownFiles" -}}
ordinal="${POD_NAME##*-}"
{{- include "apiary.announceLines" . }}
{{- if .identitySecret }}
export APIARY_IDENTITY="/etc/apiary/identity/{{ .service }}-$ordinal.key"
{{- end }}
{{- if .root.Values.security.accessTokens.existingSecret }}
export APIARY_ACCESS_TOKEN="/etc/apiary/access-tokens/{{ .service }}-$ordinal.token"
{{- end }}
{{- end -}}

{{/* The command of an expert-server, trainer or averager container: `apiary <service>`, through a
shell that first points it at its own files when it has any (apiary.ownFiles); pass as for
apiary.ownFiles. */}}
{{- define "apiary.command" -}}
{{- if or .identitySecret .root.Values.security.accessTokens.existingSecret (include "apiary.announceLines" .) }}
command: ["/bin/sh", "-c"]
args:
  - |
    {{- include "apiary.ownFiles" . | nindent 4 }}
    exec apiary {{ .service }}
{{- else }}
command: ["apiary", {{ .service | quote }}]
{{- end }}
{{- end -}}

{{/* The pod's name, from which apiary.ownFiles takes the ordinal. */}}
{{- define "apiary.podNameEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/* Mounts of the Secrets with a container's own files; pass (dict "root" $ "identitySecret" ..). */}}
{{- define "apiary.secretMounts" -}}
{{- if .identitySecret }}
- name: identity
  mountPath: /etc/apiary/identity
  readOnly: true
{{- end }}
{{- if .root.Values.security.accessTokens.existingSecret }}
- name: access-tokens
  mountPath: /etc/apiary/access-tokens
  readOnly: true
{{- end }}
{{- end -}}

{{/* The Secret volumes of apiary.secretMounts (readable by the pod's group: fsGroup). */}}
{{- define "apiary.secretVolumes" -}}
{{- with .identitySecret }}
- name: identity
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- with .root.Values.security.accessTokens.existingSecret }}
- name: access-tokens
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* A public container port; pass (dict "name" "dht" "port" 31337). */}}
{{- define "apiary.publicPort" -}}
- name: {{ .name }}
  containerPort: {{ .port }}
  protocol: TCP
{{- end -}}

{{/* Probes on a service's admin endpoint; pass the admin port's name. */}}
{{- define "apiary.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: {{ . }}}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: {{ . }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: {{ . }}}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* The pod-level fields of a GPU workload; pass its values (expertServer or trainer). */}}
{{- define "apiary.gpuScheduling" -}}
{{- if and .runtimeClassName (gt (int .gpus) 0) }}
runtimeClassName: {{ .runtimeClassName }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A data volume claim template, or nothing (then an emptyDir); pass (dict "persistence" .. "root" $ "component" ..). */}}
{{- define "apiary.volumeClaim" -}}
{{- if .persistence.enabled }}
volumeClaimTemplates:
  - metadata:
      name: data
      labels:
        {{- include "apiary.labels" (dict "root" .root "component" .component) | nindent 8 }}
    spec:
      accessModes: [ReadWriteOnce]
      {{- with .persistence.storageClass }}
      storageClassName: {{ . }}
      {{- end }}
      resources:
        requests:
          storage: {{ .persistence.size }}
{{- end }}
{{- end -}}

{{/* A GPU workload's resources with its gpuResource (nvidia.com/gpu or a MIG profile) requested (and
limited) when gpus > 0; pass its values. */}}
{{- define "apiary.gpuResources" -}}
{{- $resources := deepCopy (default (dict) .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- range $kind := list "requests" "limits" -}}
{{- $_ := set $resources $kind (merge (dict (default "nvidia.com/gpu" $.gpuResource) (int $.gpus)) (default (dict) (get $resources $kind))) -}}
{{- end -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}
