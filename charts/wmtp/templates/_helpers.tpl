{{- define "wmtp.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "wmtp.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wmtp.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "wmtp.serviceAccountName" -}}
{{- default (include "wmtp.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Namespaces that get a Role for the operator and the trainer ServiceAccount. */}}
{{- define "wmtp.namespaces" -}}
{{- if or .Values.watch.clusterWide (empty .Values.watch.namespaces) -}}{{ list .Release.Namespace | toJson }}
{{- else -}}{{ .Values.watch.namespaces | toJson }}{{- end -}}
{{- end -}}

{{/* What the operator does to WMTPRuns and their children: exactly the verbs of wmtp_operator.kube.ACCESS (a test
compares them). Shared by the ClusterRole and the Roles. */}}
{{- define "wmtp.operatorRules" -}}
- apiGroups: [wmtp.io]
  resources: [wmtpruns]
  verbs: [get, list, watch, patch]
- apiGroups: [wmtp.io]
  resources: [wmtpruns/status]
  verbs: [patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims, serviceaccounts]
  verbs: [get, create]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{- define "wmtp.mlflowName" -}}
{{ include "wmtp.fullname" . | trunc 56 | trimSuffix "-" }}-mlflow
{{- end -}}

{{/* The tracking URI of runs that set none: the values' default, else the chart's MLflow server, else none. */}}
{{- define "wmtp.mlflowUri" -}}
{{- if .Values.defaults.mlflowTrackingUri -}}{{ .Values.defaults.mlflowTrackingUri }}
{{- else if .Values.mlflow.enabled -}}http://{{ include "wmtp.mlflowName" . }}.{{ .Release.Namespace }}.svc:5000
{{- end -}}
{{- end -}}

{{/* MLflow needs a volume for sqlite unless a database URI is given, for artifacts unless they go to S3, and for
its users and permissions (sqlite) when authentication is on. */}}
{{- define "wmtp.mlflowVolume" -}}
{{- $m := .Values.mlflow -}}
{{- if or (not $m.databaseUriSecret.name) (not $m.artifacts.s3Uri) $m.auth.enabled -}}true{{- end -}}
{{- end -}}

{{/* The Secret with the MLflow admin's password and the server's Flask key: the values' own, else the chart's. */}}
{{- define "wmtp.mlflowAuthSecret" -}}
{{ .Values.mlflow.auth.secret | default (printf "%s-auth" (include "wmtp.mlflowName" .)) }}
{{- end -}}
