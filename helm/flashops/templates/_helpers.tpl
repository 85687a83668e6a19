{{/* Names, labels and the settings several templates share. */}}

{{- define "flashops.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flashops.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: flashops
app.kubernetes.io/part-of: flashops
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "operator") */}}
{{- define "flashops.selectorLabels" -}}
app.kubernetes.io/name: flashops
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flashops.componentLabels" -}}
{{ include "flashops.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The CPU image runs the operator and the lineage API; trainers and predictors get image.flavor. */}}
{{- define "flashops.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "flashops.workloadImage" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if eq .Values.image.flavor "cuda" -}}{{- $tag = printf "%s-cuda" $tag -}}{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "flashops.operatorName" -}}{{ include "flashops.fullname" . }}-operator{{- end -}}
{{- define "flashops.lineageName" -}}{{ include "flashops.fullname" . }}-lineage{{- end -}}
{{- define "flashops.postgresqlName" -}}{{ include "flashops.fullname" . }}-postgresql{{- end -}}
{{- define "flashops.minioName" -}}{{ include "flashops.fullname" . }}-minio{{- end -}}

{{/* ---------------------------------------------------------------- secrets */}}

{{- define "flashops.s3SecretName" -}}
{{- .Values.s3.credentials.existingSecret | default (printf "%s-s3" (include "flashops.fullname" .)) -}}
{{- end -}}

{{- define "flashops.dbSecretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- .Values.postgresql.auth.existingSecret | default (printf "%s-db" (include "flashops.fullname" .)) -}}
{{- else -}}
{{- .Values.postgresql.external.existingSecret | default (printf "%s-db" (include "flashops.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{- define "flashops.dbPasswordKey" -}}
{{- if .Values.postgresql.enabled -}}{{ .Values.postgresql.auth.passwordKey }}{{- else -}}{{ .Values.postgresql.external.passwordKey }}{{- end -}}
{{- end -}}

{{- define "flashops.lineageSecretName" -}}
{{- .Values.lineage.auth.existingSecret | default (printf "%s-lineage" (include "flashops.fullname" .)) -}}
{{- end -}}

{{/* A generated secret value that survives upgrades: (dict "ctx" $ "secret" NAME "key" KEY "length" N) */}}
{{- define "flashops.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret -}}
{{- if and $existing (index ($existing.data | default dict) .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (.length | int) -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- endpoints */}}

{{- define "flashops.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "http://%s.%s.svc:9000" (include "flashops.minioName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.s3.external.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "flashops.s3Secure" -}}
{{- if .Values.minio.enabled -}}false{{- else -}}{{ .Values.s3.external.secure }}{{- end -}}
{{- end -}}

{{/* KServe's storage initializer (runtime: vllm deployments) reads the S3 endpoint from these annotations on the
     Secret of the predictor's ServiceAccount. usehttps is always written: KServe's default is https, the
     classic MinIO trap. Endpoint without scheme, as KServe wants it. */}}
{{- define "flashops.kserveS3Annotations" -}}
serving.kserve.io/s3-endpoint: {{ include "flashops.s3Endpoint" . | trimPrefix "https://" | trimPrefix "http://" | trimSuffix "/" | quote }}
serving.kserve.io/s3-usehttps: {{ ternary "1" "0" (eq (include "flashops.s3Secure" .) "true") | quote }}
serving.kserve.io/s3-region: {{ .Values.s3.region | quote }}
{{- end -}}

{{- define "flashops.hasCaBundle" -}}
{{- if and (not .Values.minio.enabled) (or .Values.s3.external.caBundle.existingSecret .Values.s3.external.caBundle.pem) -}}true{{- end -}}
{{- end -}}

{{- define "flashops.checkpointRoot" -}}
{{- .Values.checkpointRoot | default (printf "s3://%s/checkpoints" .Values.s3.bucket) -}}
{{- end -}}

{{- define "flashops.lineageUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "flashops.lineageName" .) .Release.Namespace .Values.lineage.port -}}
{{- end -}}

{{/* The SQLAlchemy URL without the password: psycopg takes it from PGPASSWORD, so a password
     with URL-special characters needs no escaping and never shows in the pod spec. */}}
{{- define "flashops.dbUrl" -}}
{{- if .Values.postgresql.enabled -}}
{{- with .Values.postgresql.auth -}}
{{- printf "postgresql+psycopg://%s@%s.%s.svc:5432/%s" .username (include "flashops.postgresqlName" $) $.Release.Namespace .database -}}
{{- end -}}
{{- else -}}
{{- with .Values.postgresql.external -}}
{{- printf "postgresql+psycopg://%s@%s:%v/%s?sslmode=%s" .username .host .port .database .sslMode -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* S3 settings every flashops pod reads (storage.open_store). */}}
{{- define "flashops.s3Env" -}}
- name: FLASHOPS_S3_ENDPOINT
  value: {{ include "flashops.s3Endpoint" . | quote }}
- name: FLASHOPS_S3_SECURE
  value: {{ include "flashops.s3Secure" . | quote }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: FLASHOPS_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ include "flashops.s3SecretName" . }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "flashops.s3SecretName" . }}, key: AWS_SECRET_ACCESS_KEY}
{{- if include "flashops.hasCaBundle" . }}
- name: FLASHOPS_S3_CA_BUNDLE
  value: /etc/flashops/s3-ca/ca.crt
{{- end }}
{{- end -}}

{{/* The CA bundle is always a Secret: the user's existingSecret, or one the chart makes from the PEM. */}}
{{- define "flashops.caBundleSecretName" -}}
{{- .Values.s3.external.caBundle.existingSecret | default (printf "%s-s3-ca" (include "flashops.fullname" .)) -}}
{{- end -}}

{{- define "flashops.caBundleVolume" -}}
{{- if include "flashops.hasCaBundle" . -}}
- name: s3-ca
  secret:
    secretName: {{ include "flashops.caBundleSecretName" . }}
    items: [{key: ca.crt, path: ca.crt}]
{{- end }}
{{- end -}}

{{- define "flashops.caBundleMount" -}}
{{- if include "flashops.hasCaBundle" . -}}
- {name: s3-ca, mountPath: /etc/flashops/s3-ca, readOnly: true}
{{- end }}
{{- end -}}

{{- define "flashops.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end -}}

{{- define "flashops.containerSecurityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end -}}
