{{/* Names, labels and the pieces every AsyncOPD pod shares. */}}

{{- define "asyncopd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "asyncopd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "asyncopd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "asyncopd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: asyncopd
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "cache") */}}
{{- define "asyncopd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "asyncopd.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "asyncopd.componentLabels" -}}
{{ include "asyncopd.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image of a role: (dict "ctx" $ "component" "cache"), or the root context for the shared image.
With image.perRole the tag gets the role's suffix (deploy/Dockerfile builds one target per role:
<tag>-cache and <tag>-autoscaler are slim, without torch); otherwise every role runs the `all` image. */}}
{{- define "asyncopd.image" -}}
{{- $ctx := . -}}
{{- $component := "" -}}
{{- if hasKey . "ctx" }}{{ $ctx = .ctx }}{{ $component = .component }}{{ end -}}
{{- $tag := default $ctx.Chart.AppVersion $ctx.Values.image.tag -}}
{{- if and $ctx.Values.image.perRole $component }}{{ $tag = printf "%s-%s" $tag $component }}{{ end -}}
{{- printf "%s:%s" $ctx.Values.image.repository $tag }}
{{- end }}

{{- define "asyncopd.redisSecretName" -}}
{{- default (printf "%s-redis" (include "asyncopd.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "asyncopd.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{- define "asyncopd.weightsyncSecretName" -}}
{{- default (printf "%s-weightsync" (include "asyncopd.fullname" .)) .Values.weightsyncAuth.existingSecret }}
{{- end }}

{{- define "asyncopd.weightsyncSecretKey" -}}
{{- if .Values.weightsyncAuth.existingSecret }}{{ .Values.weightsyncAuth.existingSecretKey }}{{ else }}weightsync-key{{ end }}
{{- end }}

{{- define "asyncopd.redisUrl" -}}
{{- if eq .Values.redis.mode "external" }}
{{- required "redis.external.url is required when redis.mode=external" .Values.redis.external.url }}
{{- else }}
{{- printf "redis://%s-redis:6379/0" (include "asyncopd.fullname" .) }}
{{- end }}
{{- end }}

{{/* The learner's stable DNS name through its headless Service. */}}
{{- define "asyncopd.learnerHost" -}}
{{- $f := include "asyncopd.fullname" . -}}
{{- printf "%s-learner-0.%s-learner.%s.svc" $f $f .Release.Namespace }}
{{- end }}

{{/* Pod security context of every AsyncOPD pod. */}}
{{- define "asyncopd.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The container running `asyncopd serve <component>`: (dict "ctx" $ "component" "cache" "port" 50051) */}}
{{- define "asyncopd.serveContainer" -}}
{{- $ := .ctx -}}
- name: {{ .component }}
  image: {{ include "asyncopd.image" (dict "ctx" $ "component" .component) }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  args: ["serve", "{{ .component }}", "-c", "/etc/asyncopd/config.yaml", "--name", "$(POD_NAME)"]
  securityContext:
    {{- toYaml $.Values.containerSecurityContext | nindent 4 }}
  ports:
    - name: grpc
      containerPort: {{ .port }}
      protocol: TCP
    - name: metrics
      containerPort: {{ $.Values.ports.metrics }}
      protocol: TCP
    {{- range .extraPorts }}
    - name: {{ .name }}
      containerPort: {{ .port }}
      protocol: TCP
    {{- end }}
  env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    # The root filesystem is read-only: caches and home go to the writable volumes.
    - name: HOME
      value: /tmp
    - name: XDG_CACHE_HOME
      value: /var/cache/asyncopd
    - name: HF_HOME
      value: /var/cache/asyncopd/huggingface
    {{- if .redisPassword }}
    - name: ASYNCOPD_REDIS_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ include "asyncopd.redisSecretName" $ }}
          key: {{ include "asyncopd.redisSecretKey" $ }}
    {{- end }}
    {{- if and .weightsyncKey $.Values.weightsyncAuth.enabled }}
    # Signs (learner) and verifies (rollout) the weight-sync store's assignments and commands.
    - name: ASYNCOPD_WEIGHTSYNC_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "asyncopd.weightsyncSecretName" $ }}
          key: {{ include "asyncopd.weightsyncSecretKey" $ }}
    {{- end }}
    {{- if and $.Values.modelCache.enabled $.Values.modelCache.offline }}
    # The model cache Job downloaded everything: never reach the Hub from a serving pod.
    - name: HF_HUB_OFFLINE
      value: "1"
    - name: TRANSFORMERS_OFFLINE
      value: "1"
    {{- end }}
    {{- with $.Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with .v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with concat (default (list) $.Values.extraEnvFrom) (default (list) .v.extraEnvFrom) }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- include "asyncopd.probes" (dict "ctx" $ "port" .port "host" .host) | nindent 2 }}
  {{- with .resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - {name: config, mountPath: /etc/asyncopd, readOnly: true}
    - {name: tmp, mountPath: /tmp}
    - {name: cache, mountPath: /var/cache/asyncopd}
    - {name: data, mountPath: /var/lib/asyncopd}
    - {name: shm, mountPath: /dev/shm}
    {{- if $.Values.tls.enabled }}
    - {name: tls, mountPath: /etc/asyncopd-tls, readOnly: true}
    {{- end }}
    {{- if and .models (include "asyncopd.modelsClaim" $) }}
    - {name: models, mountPath: {{ $.Values.models.mountPath }}, readOnly: true}
    {{- end }}
    {{- with concat (default (list) $.Values.extraVolumeMounts) (default (list) .v.extraVolumeMounts) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Probes on the gRPC health service (grpc.health.v1): (dict "ctx" $ "port" N "host" "svc-dns") */}}
{{- define "asyncopd.probes" -}}
{{- $ := .ctx -}}
{{- $p := $.Values.probes -}}
{{- $check := dict -}}
{{- if $.Values.tls.enabled }}
{{- $cmd := list "python" "-m" "asyncopd.observability.health_probe" "--port" (toString .port) "--server-name" .host "--ca" "/etc/asyncopd-tls/ca.crt" "--cert" "/etc/asyncopd-tls/tls.crt" "--key" "/etc/asyncopd-tls/tls.key" }}
{{- $check = dict "exec" (dict "command" $cmd) }}
{{- else }}
{{- $check = dict "grpc" (dict "port" (int .port)) }}
{{- end -}}
startupProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ div $p.startupSeconds $p.periodSeconds | max 1 }}
readinessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 3
livenessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}

{{/* The Secret with the TLS identity of one role (tls.crt, tls.key, ca.crt): the one cert-manager
issues (templates/certificates.yaml), or tls.existingSecrets.<role>, by default <fullname>-tls-<role>.
Each role has its own certificate naming it (URI SAN spiffe://asyncopd/<role>): the servers
authorise every RPC by that role (services/asyncopd/wire/authz.py). (dict "ctx" $ "component" "cache") */}}
{{- define "asyncopd.tlsSecret" -}}
{{- $default := printf "%s-tls-%s" (include "asyncopd.fullname" .ctx) .component -}}
{{- if .ctx.Values.tls.certManager.enabled }}{{ $default }}
{{- else }}{{ default $default (index .ctx.Values.tls.existingSecrets .component) }}
{{- end }}
{{- end }}

{{/* Volumes of a serve pod; `data` is an emptyDir unless the pod brings its own (the learner's PVC). */}}
{{- define "asyncopd.volumes" -}}
{{- $ := .ctx -}}
- name: config
  configMap:
    name: {{ include "asyncopd.fullname" $ }}-config
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ $.Values.shmSize }}}
{{- if not .ownData }}
- name: data
  emptyDir: {}
{{- end }}
{{- if $.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "asyncopd.tlsSecret" (dict "ctx" $ "component" .component) }}
    defaultMode: 0440
{{- end }}
{{- if and .models (include "asyncopd.modelsClaim" $) }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "asyncopd.modelsClaim" $ }}
    readOnly: true
{{- end }}
{{- with concat (default (list) $.Values.extraVolumes) (default (list) .v.extraVolumes) }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod labels and annotations of one component: selector labels (never overridden), then the
role's podLabels, then the chart-wide ones (e.g. a Kueue queue label); the config checksum, then
podAnnotations (role, then chart-wide). (dict "ctx" $ "component" "rollout" "v" .Values.rollout) */}}
{{- define "asyncopd.podMetadata" -}}
{{- $ := .ctx -}}
{{- $sel := include "asyncopd.selectorLabels" (dict "ctx" $ "component" .component) | fromYaml -}}
{{- $labels := merge (dict) $sel (default (dict) .v.podLabels) (default (dict) $.Values.podLabels) -}}
{{- $annotations := merge (dict "checksum/config" (include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum)) (default (dict) .v.podAnnotations) (default (dict) $.Values.podAnnotations) -}}
labels:
  {{- toYaml $labels | nindent 2 }}
annotations:
  {{- toYaml $annotations | nindent 2 }}
{{- end }}

{{/* Scheduling of a pod from its role's values: (dict "v" .Values.rollout) */}}
{{- define "asyncopd.podScheduling" -}}
{{- with .v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .v.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The PVC with model weights the roles mount read-only: models.existingClaim, else the model
cache's (its existingClaim or the one the chart creates); empty when there is none. */}}
{{- define "asyncopd.modelsClaim" -}}
{{- if .Values.models.existingClaim }}{{ .Values.models.existingClaim }}
{{- else if .Values.modelCache.enabled }}{{ default (printf "%s-models" (include "asyncopd.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}
{{- end }}
