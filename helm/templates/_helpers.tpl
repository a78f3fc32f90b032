{{/*
Names. The release's full name prefixes every object; each part adds its role
("api", "worker-<group>", "beat", "flower", "migrations").
*/}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A part's object name: <fullname>-<part>, within the 63 characters a label value allows. */}}
{{- define "ferry.partName" -}}
{{- printf "%s-%s" (include "ferry.fullname" .root) .part | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: pass (dict "root" $ "component" "api"), and "group" for a worker group. */}}
{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .group }}
ferry.io/worker-group: {{ . }}
{{- end }}
{{- end -}}

{{- define "ferry.labels" -}}
helm.sh/chart: {{ include "ferry.chart" .root }}
{{ include "ferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end -}}

{{- define "ferry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ferry.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the credentials: the operator's own, or the one this chart makes. */}}
{{- define "ferry.secretName" -}}
{{- default (include "ferry.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{/*
Merge a map of overrides into a base map, in place, key by key and map by map.
Spelled out rather than sprig's mergeOverwrite, whose handling of "empty" overrides
(`enabled: false`, `minReplicaCount: 0`) has depended on the mergo version Helm was
built with: here an override always wins.
*/}}
{{- define "ferry.mergeInto" -}}
{{- $base := .base -}}
{{- range $key, $value := .over -}}
{{- $current := get $base $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $current) -}}
{{- $_ := include "ferry.mergeInto" (dict "base" $current "over" $value) -}}
{{- else -}}
{{- $_ := set $base $key $value -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The worker groups, each merged over workerDefaults, as YAML: {groups: [...]}. */}}
{{- define "ferry.workerGroups" -}}
{{- $groups := list -}}
{{- range .Values.workers -}}
{{- $group := deepCopy $.Values.workerDefaults -}}
{{- $_ := include "ferry.mergeInto" (dict "base" $group "over" (deepCopy .)) -}}
{{- $groups = append $groups $group -}}
{{- end -}}
{{- toYaml (dict "groups" $groups) -}}
{{- end -}}

{{/*
Checks of values no schema can express: every queue has exactly one worker group, and
a group's queues exist. Included by the ConfigMap, so any render fails on a bad config.
*/}}
{{- define "ferry.validate" -}}
{{- $served := dict -}}
{{- $names := dict -}}
{{- $known := dict "ferry.control" true "index" true -}}
{{- range .Values.backends -}}
{{- $_ := set $known (printf "backend.%s" .name) true -}}
{{- end -}}
{{- range .Values.workers -}}
{{- if hasKey $names .name -}}
{{- fail (printf "workers: the group name %q is used twice" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- $group := .name -}}
{{- range .queues -}}
{{- if hasKey $served . -}}
{{- fail (printf "workers: queue %q is consumed by groups %q and %q; give each queue one group, or its two scalers would both add workers for the same messages" . (get $served .) $group) -}}
{{- end -}}
{{- if not (hasKey $known .) -}}
{{- fail (printf "workers: group %q consumes %q, which no backend in `backends` has (a backend's queue is backend.<name>)" $group .) -}}
{{- end -}}
{{- $_ := set $served . $group -}}
{{- end -}}
{{- end -}}
{{- range $queue, $_ := $known -}}
{{- if not (hasKey $served $queue) -}}
{{- fail (printf "workers: no group consumes queue %q; its work would wait forever (add a group with queues: [%s])" $queue $queue) -}}
{{- end -}}
{{- end -}}
{{- range $key, $_ := .Values.config -}}
{{- if has $key (list "FERRY_DATABASE_URL" "FERRY_BROKER_URL" "FERRY_FLOWER_BASIC_AUTH") -}}
{{- fail (printf "config.%s is a credential: give it in `secret` (or secret.existingSecret), never in the ConfigMap" $key) -}}
{{- end -}}
{{- if has $key (list "FERRY_DATA_DIR" "FERRY_SEARCH_DIR" "FERRY_BACKENDS_FILE" "FERRY_WORKER_METRICS_PORT") -}}
{{- fail (printf "config.%s is set by the chart (volumes and ports depend on it)" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Where KEDA reads queue lengths: keda.redis.* when set, else what secret.brokerUrl says.
Returns YAML: address, databaseIndex, enableTLS, authenticate.
*/}}
{{- define "ferry.kedaRedis" -}}
{{- $redis := .Values.keda.redis -}}
{{- $url := dict -}}
{{- if not .Values.secret.existingSecret -}}
{{- $url = urlParse .Values.secret.brokerUrl -}}
{{- if not (has $url.scheme (list "redis" "rediss")) -}}
{{- fail (printf "keda: the scalers read Redis lists, but secret.brokerUrl is %s://; disable keda or autoscaling, or use a Redis broker" $url.scheme) -}}
{{- end -}}
{{- end -}}
{{- $address := $redis.address -}}
{{- if not $address -}}
{{- if .Values.secret.existingSecret -}}
{{- fail "keda.redis.address is required with secret.existingSecret: the chart cannot read the broker URL from a Secret it does not make" -}}
{{- end -}}
{{- $address = $url.host -}}
{{- if eq $url.host $url.hostname -}}
{{- $address = printf "%s:6379" $url.hostname -}}
{{- end -}}
{{- end -}}
{{- $db := toString $redis.databaseIndex -}}
{{- if and (not $redis.databaseIndex) (ne $db "0") -}}
{{- $db = default "0" (trimPrefix "/" (default "" $url.path)) -}}
{{- end -}}
{{- $tls := $redis.enableTLS -}}
{{- if kindIs "invalid" $tls -}}
{{- $tls = eq (default "" $url.scheme) "rediss" -}}
{{- end -}}
{{- $auth := $redis.authenticate -}}
{{- if kindIs "invalid" $auth -}}
{{- $auth = and (not .Values.secret.existingSecret) (ne (include "ferry.redisPassword" .) "") -}}
{{- end -}}
address: {{ $address | quote }}
databaseIndex: {{ $db | quote }}
enableTLS: {{ ternary "true" "false" $tls | quote }}
authenticate: {{ $auth }}
{{- end -}}

{{/* The Redis password KEDA authenticates with: secret.redisPassword, else the one in brokerUrl. */}}
{{- define "ferry.redisPassword" -}}
{{- if .Values.secret.redisPassword -}}
{{- .Values.secret.redisPassword -}}
{{- else if not .Values.secret.existingSecret -}}
{{- $userinfo := (urlParse .Values.secret.brokerUrl).userinfo -}}
{{- if contains ":" $userinfo -}}
{{- (splitn ":" 2 $userinfo)._1 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A hash of everything the pods read from the ConfigMaps and the Secret's values, so a change rolls them. */}}
{{- define "ferry.configChecksum" -}}
{{- list .Values.config .Values.backends .Values.secret .Values.metrics.workerPort | toJson | sha256sum -}}
{{- end -}}

{{- define "ferry.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{- define "ferry.securityContext" -}}
{{- toYaml .Values.securityContext -}}
{{- end -}}

{{/* Environment every Ferry process gets: settings from the ConfigMap, credentials from the Secret. */}}
{{- define "ferry.env" -}}
- name: FERRY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ferry.secretName" . }}
      key: database-url
- name: FERRY_BROKER_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "ferry.secretName" . }}
      key: broker-url
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ferry.envFrom" -}}
- configMapRef:
    name: {{ include "ferry.partName" (dict "root" . "part" "settings") }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Volumes: the root filesystem is read-only, so /tmp (the worker's metrics files,
gunicorn's heartbeats) and /var/lib/ferry (HOME, FERRY_DATA_DIR: beat's schedule) are
emptyDirs; the backends file comes from its ConfigMap; the search snapshots from a
claim shared by index workers and the API, if one is given.
*/}}
{{- define "ferry.volumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: backends
  configMap:
    name: {{ include "ferry.partName" (dict "root" . "part" "backends") }}
{{- if .Values.searchVolume.existingClaim }}
- name: search
  persistentVolumeClaim:
    claimName: {{ .Values.searchVolume.existingClaim }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ferry.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /var/lib/ferry
- name: backends
  mountPath: /etc/ferry
  readOnly: true
{{- if .Values.searchVolume.existingClaim }}
- name: search
  mountPath: /var/lib/ferry/search
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every Deployment and the Job. Pass (dict "root" $ "spec" <part's values>). */}}
{{- define "ferry.podCommon" -}}
serviceAccountName: {{ include "ferry.serviceAccountName" .root }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "ferry.podSecurityContext" .root | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.nodeSelector .spec.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.tolerations .spec.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.affinity .spec.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "ferry.podAnnotations" -}}
checksum/config: {{ include "ferry.configChecksum" .root }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- with .spec.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}
