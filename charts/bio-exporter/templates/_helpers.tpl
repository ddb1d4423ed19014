{{- define "bio-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bio-exporter.fullname" -}}
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

{{- define "bio-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bio-exporter.labels" -}}
helm.sh/chart: {{ include "bio-exporter.chart" . }}
{{ include "bio-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bio-exporter
{{- end }}

{{- define "bio-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bio-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "bio-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bio-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ClusterRole agent ServiceAccounts are bound to (read PersistentVolumes). */}}
{{- define "bio-exporter.agentClusterRole" -}}
{{- printf "%s-agent" (include "bio-exporter.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ClusterRole agents with auth=kubernetes are bound to (TokenReview, SubjectAccessReview). */}}
{{- define "bio-exporter.agentAuthClusterRole" -}}
{{- printf "%s-agent-auth" (include "bio-exporter.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bio-exporter.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "bio-exporter.agentImage" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) }}
{{- end }}

{{- define "bio-exporter.biomonitorNamespace" -}}
{{- if .Values.biomonitor.namespace }}
{{- .Values.biomonitor.namespace }}
{{- else if .Values.agentNamespace.create }}
{{- .Values.agentNamespace.name }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
Namespaces BioMonitors may use, comma-separated: operator.watchNamespaces, or
else the one namespace the chart's own BioMonitor would go to. The operator
gets its namespaced rights (Role) in these only, and is told the same list.
*/}}
{{- define "bio-exporter.watchNamespaces" -}}
{{- $names := .Values.operator.watchNamespaces | default (list (include "bio-exporter.biomonitorNamespace" .)) }}
{{- uniq $names | join "," }}
{{- end }}
