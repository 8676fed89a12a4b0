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

{{/* What the operator does to WMTPRuns and their children; shared by the ClusterRole and the Roles. */}}
{{- define "wmtp.operatorRules" -}}
- apiGroups: [wmtp.io]
  resources: [wmtpruns]
  verbs: [get, list, watch, patch, update]
- apiGroups: [wmtp.io]
  resources: [wmtpruns/status]
  verbs: [get, patch, update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
- apiGroups: [""]
  resources: [configmaps, services, persistentvolumeclaims]
  verbs: [get, list, watch, create, delete, patch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}
